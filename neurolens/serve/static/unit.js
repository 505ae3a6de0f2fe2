// Unit page: the activation-map toggle, arrow-key navigation, per-image reveals (click, confirm, then the
// raw pixels are fetched from the separate raw endpoint) and the live probe (server with a model loaded).
(function () {
  "use strict";
  var body = document.body, reveal = body.dataset.reveal === "1";
  var root = "../../../";
  var layerId = location.pathname.split("/").slice(-3)[0];

  var toggle = document.getElementById("show-maps");
  if (toggle) toggle.addEventListener("change", function () {
    document.querySelector(".examples").classList.toggle("maps-on", toggle.checked);
  });

  document.addEventListener("keydown", function (event) {
    if (event.target.closest("input, textarea, select") || event.metaKey || event.ctrlKey || event.altKey) return;
    var link = event.key === "ArrowLeft" ? document.getElementById("prev") : event.key === "ArrowRight" ? document.getElementById("next") : null;
    if (link) location.href = link.href;
  });

  // ----------------------------------------------------------------------------------------- reveals
  var dialog = document.getElementById("confirm"), pending = null;
  function rawUrl(shot) {
    var kind = shot.dataset.kind, unit = shot.dataset.unit, n = shot.dataset.n;
    return root + "raw/" + layerId + "/" + kind + "/" + unit + "-" + n + ".png";
  }
  function ask(shot) {
    pending = shot;
    document.getElementById("confirm-reason").textContent = shot.dataset.reason || "hidden until revealed";
    dialog.hidden = false;
    document.getElementById("confirm-no").focus();
  }
  function close() { dialog.hidden = true; pending = null; }
  function show(shot) {
    var img = shot.querySelector("img"), button = shot.querySelector(".reveal");
    fetch(rawUrl(shot), { headers: { "X-Neurolens-Reveal": "1" }, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) return response.text().then(function (text) { throw new Error(text || response.status); });
        return response.blob();
      })
      .then(function (blob) {
        shot.dataset.blurred = img.src;
        img.src = URL.createObjectURL(blob);
        img.alt = "raw image (revealed)";
        shot.classList.add("revealed");
        button.textContent = "blur";
      })
      .catch(function (error) { button.textContent = "refused"; button.title = String(error.message || error); });
  }
  function hide(shot) {
    var img = shot.querySelector("img");
    URL.revokeObjectURL(img.src);
    img.src = shot.dataset.blurred;
    img.alt = "blurred image";
    shot.classList.remove("revealed");
    shot.querySelector(".reveal").textContent = "reveal";
  }
  if (reveal && dialog) {
    document.addEventListener("click", function (event) {
      var button = event.target.closest(".reveal");
      if (!button) return;
      var shot = button.closest(".shot");
      if (shot.classList.contains("revealed")) hide(shot); else ask(shot);
    });
    document.getElementById("confirm-yes").addEventListener("click", function () { var s = pending; close(); if (s) show(s); });
    document.getElementById("confirm-no").addEventListener("click", close);
    dialog.addEventListener("click", function (event) { if (event.target === dialog) close(); });
    document.addEventListener("keydown", function (event) { if (event.key === "Escape" && !dialog.hidden) close(); });
  }

  // ----------------------------------------------------------------------------------------- probe
  var form = document.getElementById("probe-form");
  if (!form) return;
  var probe = JSON.parse(document.getElementById("probe-data").textContent);
  var errorBox = document.getElementById("probe-error"), result = document.getElementById("probe-result");
  var SVG = "http://www.w3.org/2000/svg";
  function fail(text) { errorBox.textContent = text; errorBox.hidden = false; result.hidden = true; }
  function drawHeat(answer) {
    var svg = document.getElementById("probe-heat"), h = answer.grid[0], w = answer.grid[1];
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.textContent = "";
    var scale = answer.vmax > 0 ? answer.vmax : 1;
    for (var r = 0; r < h; r++) for (var c = 0; c < w; c++) {
      var rect = document.createElementNS(SVG, "rect"), v = answer.map[r][c];
      rect.setAttribute("x", c); rect.setAttribute("y", r); rect.setAttribute("width", 1); rect.setAttribute("height", 1);
      rect.setAttribute("fill-opacity", (Math.min(Math.max(v / scale, 0), 1) * 0.8).toFixed(3));
      rect.dataset.value = v;
      svg.appendChild(rect);
    }
  }
  function markHistogram(value) {
    var marker = document.getElementById("probe-marker"), bars = document.querySelectorAll(".hist .bar");
    if (!marker || !bars.length) return;
    var first = bars[0], last = bars[bars.length - 1];
    var lo = parseFloat(first.dataset.lo), hi = parseFloat(last.dataset.hi);
    var x0 = parseFloat(first.getAttribute("x")), x1 = parseFloat(last.getAttribute("x")) + parseFloat(last.getAttribute("width"));
    var x = x0 + (Math.min(Math.max(value, lo), hi) - lo) / ((hi - lo) || 1) * (x1 - x0);
    marker.textContent = "";
    var line = document.createElementNS(SVG, "line");
    line.setAttribute("class", "probe"); line.setAttribute("x1", x); line.setAttribute("x2", x);
    line.setAttribute("y1", 0); line.setAttribute("y2", 120);
    marker.appendChild(line);
  }
  function showAnswer(answer) {
    errorBox.hidden = true;
    document.getElementById("probe-img").src = answer.preview;
    drawHeat(answer);
    document.getElementById("probe-value").textContent = answer.value.toPrecision(3);
    document.getElementById("probe-pct").textContent = answer.percentile === null ? "–" : "≈ " + answer.percentile.toFixed(1);
    var top = document.getElementById("probe-top");
    top.textContent = "";
    answer.top_units.forEach(function (u) {
      var li = document.createElement("li"), a = document.createElement("a"), s = document.createElement("span");
      a.href = u.unit + ".html"; a.textContent = (answer.unit_word || "unit") + " " + u.unit;
      s.className = "muted"; s.textContent = u.percentile === null ? "" : u.percentile.toFixed(1);
      li.appendChild(a); li.appendChild(s); top.appendChild(li);
    });
    markHistogram(answer.value);
    result.hidden = false;
    result.dataset.value = answer.value;
  }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = document.getElementById("probe-file").files[0], index = document.getElementById("probe-index").value;
    var url = root + "api/" + layerId + "/probe?unit=" + probe.unit;
    var options = { method: "POST", credentials: "same-origin", headers: { "X-Neurolens-Probe": "1" } };
    if (file) { options.body = file; options.headers["Content-Type"] = "application/octet-stream"; }
    else if (index !== "") url += "&index=" + encodeURIComponent(index);
    else { fail("choose an image file or a dataset item first"); return; }
    fetch(url, options).then(function (response) {
      return response.json().then(function (answer) { if (!response.ok) throw new Error(answer.error); return answer; });
    }).then(showAnswer).catch(function (error) { fail(String(error.message || error)); });
  });
})();
