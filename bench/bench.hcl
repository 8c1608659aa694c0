# The configuration bench/run.sh runs the gateway with: one HTTP entrypoint, one router matching
# every request, one service with the single backend that run.sh starts on 127.0.0.1:9301
# (nginx, or bench/hello.py when nginx is not installed).

entrypoints "web" {
  address = "127.0.0.1:9300"
}

routers "all" {
  rule    = "PathPrefix(`/`)"
  service = "backend"
}

services "backend" {
  load_balancer {
    servers = [
      { url = "http://127.0.0.1:9301" }
    ]
  }
}
