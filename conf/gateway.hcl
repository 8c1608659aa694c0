# The embedded default configuration of a3s-gateway.
#
# Served when the gateway starts without --config, together with four demo upstreams that the
# gateway runs in the same process: two echo services (127.0.0.1:18081 and :18082) and two
# OpenAI-style streaming chat-completion stand-ins (127.0.0.1:18091 and :18092).
#
#   curl -s http://127.0.0.1:8080/hello
#   curl -sN http://127.0.0.1:8080/v1/chat/completions \
#        -d '{"model": "demo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'

shutdown_timeout_secs = 10

entrypoints "web" {
  address = "127.0.0.1:8080"
}

routers "chat" {
  rule     = "PathPrefix(`/v1`)"
  service  = "chat"
  priority = 0
}

routers "echo" {
  rule     = "PathPrefix(`/`)"
  service  = "echo"
  priority = 10
}

services "echo" {
  load_balancer {
    strategy = "round-robin"
    servers = [
      { url = "http://127.0.0.1:18081" },
      { url = "http://127.0.0.1:18082" }
    ]
    health_check {
      path     = "/health"
      interval = "5s"
      timeout  = "2s"
    }
  }
}

services "chat" {
  load_balancer {
    strategy = "least-connections"
    servers = [
      { url = "http://127.0.0.1:18091" },
      { url = "http://127.0.0.1:18092" }
    ]
    health_check {
      path     = "/health"
      interval = "5s"
      timeout  = "2s"
    }
  }
  timeouts {
    response_header = "30s"
    idle            = "60s"
  }
}
