# bench/run.sh's gateway with metrics, the access log and the dashboard entrypoint switched on,
# to measure what observability costs against bench.hcl in the same run. run.sh sets
# BENCH_ACCESS_LOG to a file in its run directory.

entrypoints "web" {
  address = "127.0.0.1:9307"
}

entrypoints "admin" {
  address = "127.0.0.1:9308"
}

routers "all" {
  rule        = "PathPrefix(`/`)"
  service     = "backend"
  entrypoints = ["web"]
}

services "backend" {
  load_balancer {
    servers = [
      { url = "http://127.0.0.1:9301" }
    ]
  }
}

access_log {
  path = "${BENCH_ACCESS_LOG}"
}

dashboard {
  entrypoint = "admin"
}
