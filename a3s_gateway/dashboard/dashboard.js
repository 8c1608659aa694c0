// a3s-gateway dashboard: polls the admin API every 2 s and redraws the page.
// Plain JavaScript, no dependencies; every value from the API is inserted as text, never as HTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const FETCH_TIMEOUT_MS = 5000;
  const API = new URL("../api/gateway/", window.location.href);
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---- small helpers ----------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [key, value] of Object.entries(attrs)) {
        if (key === "class") {
          node.className = value;
        } else if (key === "text") {
          node.textContent = value;
        } else {
          node.setAttribute(key, value);
        }
      }
    }
    for (const child of children || []) {
      node.append(child);
    }
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      node.setAttribute(key, String(value));
    }
    return node;
  }

  function formatInt(n) {
    return Number(n).toLocaleString("en-US");
  }

  function formatMs(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms === 0) return "0";
    if (ms < 1) return ms.toFixed(2);
    if (ms < 10) return ms.toFixed(1);
    return Math.round(ms).toLocaleString("en-US");
  }

  function formatRate(perSecond) {
    if (perSecond < 10) return perSecond.toFixed(1);
    return Math.round(perSecond).toLocaleString("en-US");
  }

  function formatPercent(fraction) {
    if (fraction === null || fraction === undefined) return "–";
    const percent = fraction * 100;
    if (percent === 0) return "0 %";
    if (percent < 0.1) return "<0.1 %";
    return (percent < 10 ? percent.toFixed(1) : Math.round(percent)) + " %";
  }

  function formatUptime(seconds) {
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = Math.floor(seconds % 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  async function fetchJson(path) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch(new URL(path, API), {
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: controller.signal,
      });
      if (!response.ok) {
        throw new Error("HTTP " + response.status + " from /api/gateway/" + path);
      }
      return await response.json();
    } catch (error) {
      if (error.name === "AbortError") {
        throw new Error("no answer from /api/gateway/" + path + " within 5 s");
      }
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- header and summary ------------------------------------------------------------------

  function renderHealth(health) {
    const state = $("state");
    state.textContent = health.state;
    state.className = "state-badge state-" + String(health.state).toLowerCase();
    $("uptime").textContent = formatUptime(health.uptime_secs);
    $("kpi-connections").textContent = formatInt(health.active_connections);
    $("kpi-total").textContent = formatInt(health.total_requests);
  }

  function renderSummary(stats, services) {
    const recent = stats.series.filter((s) => s.t > stats.now - 10.5);
    const minute = stats.series.filter((s) => s.t > stats.now - 60.5);
    const requests10 = recent.reduce((sum, s) => sum + s.requests, 0);
    $("kpi-rate").textContent = recent.length ? formatRate(requests10 / recent.length) : "–";

    const requests60 = minute.reduce((sum, s) => sum + s.requests, 0);
    const errors60 = minute.reduce((sum, s) => sum + s.errors, 0);
    const errorsNode = $("kpi-errors");
    errorsNode.textContent = requests60 ? formatPercent(errors60 / requests60) : "–";
    errorsNode.className = "kpi-value" + (errors60 ? " bad" : "");

    const withLatency = recent.filter((s) => s.p50_ms !== null);
    if (withLatency.length) {
      const last = withLatency[withLatency.length - 1];
      const p99 = Math.max(...withLatency.map((s) => s.p99_ms));
      $("kpi-latency").textContent = formatMs(last.p50_ms) + " / " + formatMs(p99) + " ms";
    } else {
      $("kpi-latency").textContent = "–";
    }

    let total = 0;
    let healthy = 0;
    for (const service of services) {
      total += service.backends_total;
      healthy += service.backends_healthy;
    }
    const backendsNode = $("kpi-backends");
    backendsNode.textContent = healthy + " / " + total;
    backendsNode.className = "kpi-value " + (healthy === total ? "ok" : "bad");
  }

  // ---- services ----------------------------------------------------------------------------

  function backendStatus(backend) {
    if (backend.healthy) return "up";
    if (backend.ejected) return "ejected";
    if (!backend.active_healthy) return "failing checks";
    return "down";
  }

  function renderBackend(backend) {
    const rate = backend.recent_error_rate;
    let rateClass = "num";
    if (rate !== null && rate >= 0.05) rateClass += " rate-bad";
    else if (rate !== null && rate > 0) rateClass += " rate-warn";
    const rateCell = el("td", { class: rateClass, text: formatPercent(rate) });
    rateCell.title = formatInt(backend.recent_requests) + " requests in the last 60 s";
    return el(
      "tr",
      {
        class: "backend " + (backend.healthy ? "healthy" : "unhealthy"),
        "data-backend": backend.url,
      },
      [
        el("td", { class: "mono" }, [el("span", { class: "dot" }), backend.url]),
        el("td", { class: "status", text: backendStatus(backend) }),
        el("td", { class: "num", text: String(backend.weight) }),
        el("td", { class: "num", text: formatInt(backend.active_connections) }),
        rateCell,
      ],
    );
  }

  function renderServices(services) {
    const container = $("services");
    if (!services.length) {
      container.replaceChildren(el("div", { class: "empty", text: "No services configured." }));
      return;
    }
    container.replaceChildren(
      ...services.map((service) => {
        let countClass = "service-count all-up";
        if (service.backends_healthy === 0) countClass = "service-count all-down";
        else if (service.backends_healthy < service.backends_total) {
          countClass = "service-count some-down";
        }
        const head = el("div", { class: "service-head" }, [
          el("h3", { text: service.name }),
          el("span", { class: "strategy", text: service.strategy }),
          el("span", {
            class: countClass,
            text: service.backends_healthy + " / " + service.backends_total + " healthy",
          }),
        ]);
        const table = el("table", { class: "table backends" }, [
          el("thead", {}, [
            el("tr", {}, [
              el("th", { text: "Backend" }),
              el("th", { text: "Status" }),
              el("th", { class: "num", text: "Weight" }),
              el("th", { class: "num", text: "Active" }),
              el("th", { class: "num", text: "Errors · 1 min" }),
            ]),
          ]),
          el("tbody", {}, service.backends.map(renderBackend)),
        ]);
        return el("div", { class: "service", "data-service": service.name }, [
          head,
          el("div", { class: "table-wrap" }, [table]),
        ]);
      }),
    );
  }

  // ---- routers -----------------------------------------------------------------------------

  function chips(names, emptyText) {
    if (!names.length) return [el("span", { class: "chip chip-all", text: emptyText })];
    return names.map((name) => el("span", { class: "chip", text: name }));
  }

  function renderRoutes(routes) {
    const body = $("routers").tBodies[0];
    if (!routes.length) {
      body.replaceChildren(
        el("tr", {}, [el("td", { class: "empty", colspan: "6", text: "No routers configured." })]),
      );
      return;
    }
    body.replaceChildren(
      ...routes.map((route) =>
        el("tr", { class: "router", "data-router": route.name }, [
          el("td", { text: route.name }),
          el("td", {}, [el("code", { class: "rule", text: route.rule })]),
          el("td", { text: route.service }),
          el("td", {}, chips(route.entrypoints, "all")),
          el("td", {}, chips(route.middlewares, "none")),
          el("td", { class: "num", text: String(route.priority) }),
        ]),
      ),
    );
  }

  // ---- charts ------------------------------------------------------------------------------

  // The smallest of 1, 2, 2.5 and 5 times a power of ten that is at least value.
  function niceStep(value) {
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * magnitude) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function chartSpan(stats) {
    if (!stats.series.length) return 60;
    const available = stats.now - stats.series[0].t;
    return Math.min(stats.window_secs, Math.max(60, Math.ceil(available / 60) * 60));
  }

  function spanLabel(seconds) {
    return seconds % 60 === 0 && seconds >= 120 ? "-" + seconds / 60 + "m" : "-" + seconds + "s";
  }

  // Draws the layers of one chart: "area" layers fill down to zero, "line" layers break where
  // a value is null (a second without requests has no latency).
  function drawChart(svg, stats, layers, formatTick) {
    const width = svg.clientWidth || 600;
    const height = svg.clientHeight || 200;
    const margin = { left: 46, right: 12, top: 10, bottom: 22 };
    const plotW = width - margin.left - margin.right;
    const plotH = height - margin.top - margin.bottom;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);

    const span = chartSpan(stats);
    const since = stats.now - span;
    const points = stats.series.filter((s) => s.t >= since);
    let highest = 0;
    for (const layer of layers) {
      for (const s of points) {
        const v = s[layer.key];
        if (v !== null && v > highest) highest = v;
      }
    }
    // Three to five gridlines at round values, with some headroom above the highest point.
    const headroom = highest * 1.1;
    const step = headroom > 0 ? niceStep(headroom / 4) : 1;
    const ticks = headroom > 0 ? Math.max(1, Math.ceil(headroom / step)) : 4;
    const top = ticks * step;
    const x = (t) => margin.left + ((t - since) / span) * plotW;
    const y = (v) => margin.top + plotH - (v / top) * plotH;
    const nodes = [];

    for (let i = 0; i <= ticks; i++) {
      const value = step * i;
      const yy = y(value);
      nodes.push(svgEl("line", { class: "grid", x1: margin.left, x2: width - margin.right, y1: yy, y2: yy }));
      const label = svgEl("text", { class: "axis-label", x: margin.left - 6, y: yy + 4, "text-anchor": "end" });
      label.textContent = formatTick(value);
      nodes.push(label);
    }
    for (let i = 0; i <= 4; i++) {
      const secondsAgo = span - (span * i) / 4;
      const label = svgEl("text", {
        class: "axis-label",
        x: x(since + (span * i) / 4),
        y: height - 6,
        "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle",
      });
      label.textContent = secondsAgo === 0 ? "now" : spanLabel(secondsAgo);
      nodes.push(label);
    }

    if (!points.length || highest === 0) {
      const note = svgEl("text", {
        class: "no-data",
        x: margin.left + plotW / 2,
        y: margin.top + plotH / 2,
        "text-anchor": "middle",
      });
      note.textContent = points.length ? "no requests yet" : "collecting samples…";
      nodes.push(note);
    }

    for (const layer of layers) {
      const segments = [];
      let current = [];
      for (const s of points) {
        const v = s[layer.key];
        if (v === null) {
          if (current.length) segments.push(current);
          current = [];
        } else {
          current.push([x(s.t), y(v)]);
        }
      }
      if (current.length) segments.push(current);
      for (const segment of segments) {
        const line = segment.map((p, i) => (i ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1)).join(" ");
        if (layer.kind === "area") {
          const base = y(0).toFixed(1);
          const first = segment[0][0].toFixed(1);
          const last = segment[segment.length - 1][0].toFixed(1);
          nodes.push(svgEl("path", { class: "area-" + layer.cls, d: line + " L" + last + " " + base + " L" + first + " " + base + " Z" }));
        }
        nodes.push(svgEl("path", { class: "line-" + layer.cls, d: line }));
      }
    }
    svg.replaceChildren(...nodes);
    return span;
  }

  function renderStats(stats) {
    const span = drawChart(
      $("chart-requests"),
      stats,
      [
        { key: "requests", cls: "requests", kind: "area" },
        { key: "errors", cls: "errors", kind: "area" },
      ],
      (v) => (Number.isInteger(v) ? formatInt(v) : v.toFixed(1)),
    );
    drawChart(
      $("chart-latency"),
      stats,
      [
        { key: "p50_ms", cls: "p50", kind: "line" },
        { key: "p99_ms", cls: "p99", kind: "line" },
      ],
      (v) => formatMs(v),
    );
    $("traffic-span").textContent =
      "last " + (span >= 120 ? span / 60 + " minutes" : span === 60 ? "minute" : span + " seconds") +
      ", one sample per second";
  }

  // ---- polling -----------------------------------------------------------------------------

  let lastStats = null;

  function showError(message) {
    const banner = $("error-banner");
    banner.textContent =
      "Cannot reach the gateway's admin API (" + message + "). Showing the last data received; retrying every 2 s.";
    banner.hidden = false;
    const state = $("state");
    state.textContent = "unreachable";
    state.className = "state-badge state-unreachable";
  }

  function clearError() {
    $("error-banner").hidden = true;
  }

  async function loadVersion() {
    try {
      const version = await fetchJson("version");
      $("version").textContent = "v" + version.version;
    } catch (error) {
      // The next poll shows the banner; the version is retried on the next load.
    }
  }

  async function poll() {
    try {
      const [health, services, routes, stats] = await Promise.all([
        fetchJson("health"),
        fetchJson("services"),
        fetchJson("routes"),
        fetchJson("stats"),
      ]);
      renderHealth(health);
      renderServices(services);
      renderRoutes(routes);
      renderStats(stats);
      renderSummary(stats, services);
      lastStats = stats;
      $("updated").textContent = new Date().toLocaleTimeString("en-GB");
      clearError();
      document.body.setAttribute("data-loaded", "true");
      if (!$("version").textContent) loadVersion();
    } catch (error) {
      showError(error && error.message ? error.message : String(error));
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  window.addEventListener("resize", () => {
    if (lastStats) renderStats(lastStats);
  });

  loadVersion();
  poll();
})();
