# bench/run.sh's gateway with a middleware chain (api-key, rate-limit, headers) on its one router,
# to measure what the chain costs against bench.hcl in the same run. The rate limit is high
# enough never to refuse; wrk sends the key.

entrypoints "web" {
  address = "127.0.0.1:9306"
}

routers "all" {
  rule        = "PathPrefix(`/`)"
  service     = "backend"
  middlewares = ["key", "rate", "headers"]
}

services "backend" {
  load_balancer {
    servers = [
      { url = "http://127.0.0.1:9301" }
    ]
  }
}

middlewares "key" {
  type = "api-key"
  keys = ["bench-key"]
}

middlewares "rate" {
  type  = "rate-limit"
  rate  = 10000000
  burst = 10000000
}

middlewares "headers" {
  type = "headers"
  request_headers = {
    "X-Bench" = "1"
  }
  response_headers = {
    "X-Frame-Options" = "DENY"
  }
}
