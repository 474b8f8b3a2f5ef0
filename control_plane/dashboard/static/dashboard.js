// slmops dashboard: swaps each page's live block every 2 s and draws the charts as inline SVG.
// No library and no token here: requests carry the HttpOnly session cookie.
(function () {
  "use strict";
  var REFRESH_MS = 2000;
  // Charts move slower than states and each refresh reads telemetry: every 5th tick is plenty.
  var CHART_EVERY = 5;
  var ticks = 0;
  var SVG = "http://www.w3.org/2000/svg";

  // Every action asks first: the button (or its form) says what will happen.
  document.addEventListener("submit", function (event) {
    var source = event.submitter || event.target;
    var message = (source && source.dataset && source.dataset.confirm) || event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });
  var COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#4b5563"];

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function clock(ms) {
    var d = new Date(ms);
    return d.toISOString().substring(11, 19);
  }

  function tickLabel(v) {
    return String(Math.round(v * 100) / 100);
  }

  function fmt(v) {
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  // series: [{name, points: [[epochMs, value], ...]}] -> an <svg> with one <path> per series.
  function lineChart(series, unit) {
    var W = 640, H = 240, L = 52, R = 12, T = 12, B = 28;
    var all = [];
    series.forEach(function (s) { all = all.concat(s.points); });
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, class: "line-chart", role: "img" });
    if (!all.length) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no telemetry in this range"));
      return svg;
    }
    var xs = all.map(function (p) { return p[0]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) { x0 -= 30000; x1 += 30000; }
    var yMax = niceMax(Math.max.apply(null, all.map(function (p) { return p[1]; })) * 1.1);
    var sx = function (t) { return L + (t - x0) / (x1 - x0) * (W - L - R); };
    var sy = function (v) { return T + (1 - v / yMax) * (H - T - B); };
    for (var i = 0; i <= 4; i++) {
      var v = yMax * i / 4, y = sy(v);
      svg.appendChild(el("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
      svg.appendChild(el("text", { x: L - 6, y: y + 4, "text-anchor": "end", class: "tick" }, tickLabel(v)));
    }
    svg.appendChild(el("text", { x: 4, y: T + 4, class: "tick unit" }, unit));
    [x0, (x0 + x1) / 2, x1].forEach(function (t, k) {
      var anchor = ["start", "middle", "end"][k];
      svg.appendChild(el("text", { x: sx(t), y: H - 8, "text-anchor": anchor, class: "tick" }, clock(t)));
    });
    series.forEach(function (s, n) {
      if (!s.points.length) return;
      var color = COLORS[n % COLORS.length];
      var d = s.points.map(function (p, j) { return (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1); }).join(" ");
      var path = el("path", { d: d, fill: "none", stroke: color, "stroke-width": 2, "stroke-linejoin": "round", class: "series" });
      path.setAttribute("data-series", s.name);
      svg.appendChild(path);
      s.points.forEach(function (p) {
        var dot = el("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, fill: color });
        dot.appendChild(el("title", {}, s.name + " · " + clock(p[0]) + " · " + fmt(p[1]) + " " + unit));
        svg.appendChild(dot);
      });
    });
    return svg;
  }

  function legend(box, series) {
    box.textContent = "";
    series.forEach(function (s, n) {
      var item = document.createElement("span");
      item.className = "key";
      var swatch = document.createElement("i");
      swatch.className = "swatch c" + (n % COLORS.length);
      item.appendChild(swatch);
      var last = s.points.length ? s.points[s.points.length - 1][1] : null;
      item.appendChild(document.createTextNode(s.name + (last === null ? "" : " · " + fmt(last))));
      box.appendChild(item);
    });
  }

  function drawChart(fig, data) {
    var series = data[fig.getAttribute("data-metric")] || [];
    var body = fig.querySelector(".chart-body");
    body.textContent = "";
    body.appendChild(lineChart(series, fig.getAttribute("data-unit") || ""));
    legend(fig.querySelector(".legend"), series);
  }

  function signedOut(response) {
    if (response.status !== 401) return false;
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    return true;
  }

  var cache = {};
  function refreshCharts() {
    var figs = document.querySelectorAll("[data-chart]");
    var byUrl = {};
    figs.forEach(function (f) { (byUrl[f.getAttribute("data-chart")] = byUrl[f.getAttribute("data-chart")] || []).push(f); });
    return Promise.all(Object.keys(byUrl).map(function (url) {
      return fetch(url, { credentials: "same-origin" }).then(function (r) {
        if (signedOut(r) || !r.ok) return;
        return r.json().then(function (data) {
          var text = JSON.stringify(data);
          if (cache[url] === text) return;  // unchanged: keep the DOM (and any hover) as it is
          cache[url] = text;
          byUrl[url].forEach(function (f) { drawChart(f, data); });
        });
      });
    }));
  }

  var lastHtml = null;
  function refreshLive() {
    var live = document.querySelector("[data-live]");
    if (!live) return Promise.resolve();
    var url = new URL(location.href);
    url.searchParams.set("partial", "live");
    return fetch(url.toString(), { credentials: "same-origin", headers: { Accept: "text/html" } }).then(function (r) {
      if (signedOut(r) || !r.ok) throw new Error("HTTP " + r.status);
      return r.text().then(function (html) {
        if (html !== lastHtml) { live.innerHTML = html; lastHtml = html; }
      });
    });
  }

  function tick() {
    var status = document.getElementById("live-status");
    ticks += 1;
    var charts = ticks % CHART_EVERY === 0 ? refreshCharts() : Promise.resolve();
    Promise.all([refreshLive(), charts]).then(function () {
      var when = "updated " + new Date().toISOString().substring(11, 19) + " UTC";
      if (status) { status.classList.remove("stale"); status.title = when; }
      var stamp = document.getElementById("updated");
      if (stamp) stamp.textContent = when;
    }).catch(function () {
      if (status) status.classList.add("stale");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!document.getElementById("live-status")) return;  // the login page has nothing live
    refreshCharts();
    setInterval(tick, REFRESH_MS);
  });
})();
