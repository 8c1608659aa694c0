# gateway.hcl — every block in use
shutdown_timeout_secs = 30

entrypoints "web" {
  address = "0.0.0.0:8080"
}

entrypoints "websecure" {
  address  = "0.0.0.0:8443"
  protocol = "http"
  tls {
    cert_file   = "/etc/gateway/certs/cert.pem"
    key_file    = "/etc/gateway/certs/key.pem"
    min_version = "1.2"
    acme        = false
  }
}

entrypoints "tcp-db" {
  address         = "0.0.0.0:15432"
  protocol        = "tcp"
  max_connections = 100
  tcp_allowed_ips = ["10.0.0.0/8", "127.0.0.1"]
}

entrypoints "udp-dns" {
  address                  = "0.0.0.0:5353"
  protocol                 = "udp"
  udp_session_timeout_secs = 30
  udp_max_sessions         = 10000
}

routers "llm-api" {
  rule        = "Host(`api.example.com`) && PathPrefix(`/v1`)"
  service     = "llm"
  entrypoints = ["web", "websecure"]
  middlewares = ["cors", "auth-jwt", "rate-limit", "circuit-breaker", "security-headers"]
  priority    = 0
}

routers "health" {
  rule     = "Path(`/health`)"
  service  = "llm"
  priority = -10
}

routers "models" {
  rule        = "PathPrefix(`/models`) && Method(`POST`) && Headers(`X-Env`, `canary`)"
  service     = "model"
  entrypoints = ["web"]
  middlewares = ["strip-models", "body-limit", "api-key", "retry", "compress"]
}

routers "admin" {
  rule        = "PathPrefix(`/admin`)"
  service     = "admin"
  entrypoints = ["web"]
  middlewares = ["admin-ip", "admin-basic", "admin-fwd"]
}

routers "db" {
  rule        = "PathPrefix(`/`)"
  service     = "postgres"
  entrypoints = ["tcp-db"]
}

routers "dns" {
  rule        = "PathPrefix(`/`)"
  service     = "dns"
  entrypoints = ["udp-dns"]
}

services "llm" {
  load_balancer {
    strategy = "least-connections"
    servers = [
      { url = "http://127.0.0.1:8001", weight = 1 },
      { url = "http://127.0.0.1:8002", weight = 1 }
    ]
    health_check {
      path                = "/health"
      interval            = "10s"
      timeout             = "5s"
      unhealthy_threshold = 3
      healthy_threshold   = 1
    }
    sticky {
      cookie = "llm_session"
    }
  }
  mirror {
    service    = "llm-shadow"
    percentage = 5
  }
  failover {
    service = "llm-backup"
  }
  scaling {
    min_replicas          = 0
    max_replicas          = 8
    container_concurrency = 10
    target_utilization    = 0.7
    scale_down_delay_secs = 300
    buffer_enabled        = true
    buffer_size           = 100
    buffer_timeout_secs   = 30
    executor              = "box"
  }
}

services "llm-shadow" {
  load_balancer {
    servers = [{ url = "http://127.0.0.1:8101" }]
  }
}

services "llm-backup" {
  load_balancer {
    strategy = "round-robin"
    servers  = [{ url = "http://127.0.0.1:8201" }]
  }
}

services "model" {
  load_balancer {
    servers = [{ url = "http://127.0.0.1:9001" }]
  }
  revisions = [
    { name = "v1", traffic_percent = 90, servers = [{ url = "http://127.0.0.1:9001" }] },
    { name = "v2", traffic_percent = 10, strategy = "weighted", servers = [{ url = "http://127.0.0.1:9002", weight = 2 }] }
  ]
  rollout {
    from                 = "v1"
    to                   = "v2"
    step_percent         = 10
    step_interval_secs   = 60
    error_rate_threshold = 0.05
    latency_threshold_ms = 5000
  }
}

services "admin" {
  load_balancer {
    strategy = "weighted"
    servers = [
      { url = "http://127.0.0.1:7001", weight = 3 },
      { url = "http://127.0.0.1:7002", weight = 1 }
    ]
  }
}

services "postgres" {
  load_balancer {
    servers = [{ url = "tcp://127.0.0.1:5432" }]
  }
}

services "dns" {
  load_balancer {
    servers = [{ url = "127.0.0.1:53" }]
  }
}

middlewares "cors" {
  type            = "cors"
  allowed_origins = ["https://app.example.com"]
  allowed_methods = ["GET", "POST"]
  allowed_headers = ["Content-Type", "Authorization"]
  max_age         = 3600
}

middlewares "auth-jwt" {
  type  = "jwt"
  value = "change-me-hs256-secret"
}

middlewares "rate-limit" {
  type  = "rate-limit"
  rate  = 100
  burst = 20
}

middlewares "circuit-breaker" {
  type              = "circuit-breaker"
  failure_threshold = 5
  cooldown_secs     = 30
  success_threshold = 2
}

middlewares "security-headers" {
  type = "headers"
  request_headers = {
    "X-Forwarded-Proto" = "https"
  }
  response_headers = {
    "X-Frame-Options" = "DENY"
  }
}

middlewares "strip-models" {
  type     = "strip-prefix"
  prefixes = ["/models"]
}

middlewares "body-limit" {
  type           = "body-limit"
  max_body_bytes = 1048576
}

middlewares "api-key" {
  type   = "api-key"
  header = "X-API-Key"
  keys   = ["key-1", "key-2"]
}

middlewares "retry" {
  type              = "retry"
  max_retries       = 3
  retry_interval_ms = 100
}

middlewares "compress" {
  type = "compress"
}

middlewares "admin-ip" {
  type        = "ip-allow"
  allowed_ips = ["127.0.0.1", "10.0.0.0/8", "::1"]
}

middlewares "admin-basic" {
  type     = "basic-auth"
  username = "admin"
  password = "secret"
}

middlewares "admin-fwd" {
  type                          = "forward-auth"
  forward_auth_url              = "http://127.0.0.1:9090/verify"
  forward_auth_response_headers = ["X-User-Id", "X-User-Role"]
}

providers {
  file {
    watch     = true
    directory = "/etc/gateway/conf.d"
  }
  discovery {
    poll_interval_secs = 30
    timeout_secs       = 5
    seeds = [
      { url = "http://127.0.0.1:8300" }
    ]
  }
  docker {
    host               = "/var/run/docker.sock"
    label_prefix       = "a3s"
    poll_interval_secs = 10
  }
  kubernetes {
    namespace           = "default"
    label_selector      = "app=web"
    watch_interval_secs = 30
    ingress_route_crd   = false
  }
}
