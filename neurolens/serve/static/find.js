// Search page: ranks the units (or SAE features) of each layer for a query over the layer's search index
// (L/<layer id>/find-index.js, made by neurolens.serve.concepts), the same ranking as `neurolens find`
// (neurolens.pipelines.find): the query is a concept name, else a lexicon word of a concept, else free text (every
// word of it that is not a stopword must be a word of the caption); per unit, the share of its top images whose
// captions match, over those with a known match, and its 95% Wilson interval; ranked by the interval's lower end,
// ties by the share, then (a concept) the concept's AUC, then the unit. The text score (model-based) is shown,
// never ranked on. Text goes into the page with textContent only; images are the blurred tiles.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("find-data").textContent);
  var form = document.getElementById("find-form"), qBox = document.getElementById("find-q");
  var layerBox = document.getElementById("find-layer"), results = document.getElementById("find-results");
  var countBox = document.getElementById("find-count");
  var SHOW = 50;
  var WORD = /[\p{L}\p{N}]+(?:'[\p{L}\p{N}]+)*/gu;

  function words(text) {
    return (String(text).toLowerCase().match(WORD) || []).map(function (w) { return w.replace(/'/g, ""); });
  }
  function load(layer, done) {
    if (window.neurolensFind && window.neurolensFind[layer.id]) { done(); return; }
    var script = document.createElement("script");
    script.src = "L/" + encodeURIComponent(layer.id) + "/find-index.js";
    script.onload = done; script.onerror = done;
    document.head.appendChild(script);
  }
  // the query's matches over the index's images: {kind, concept, source, hits: Set, unknown: Set, auc, text}
  function parse(index, q) {
    var text = q.trim().split(/\s+/).join(" "), entry = index.queries[text.toLowerCase()];
    if (entry) {
      return {kind: entry.kind, concept: entry.concept, source: entry.source, hits: new Set(entry.hits),
              unknown: new Set(entry.unknown), auc: entry.auc, text: entry.text};
    }
    var stop = new Set(index.stopwords), tokens = words(text);
    var kept = tokens.filter(function (t) { return !stop.has(t); });
    if (!kept.length) kept = tokens;
    var hits = new Set(), unknown = new Set();
    index.captions.forEach(function (caption, i) {
      if (!String(caption).trim()) { unknown.add(i); return; }
      var own = new Set(words(caption));
      if (kept.every(function (t) { return own.has(t); })) hits.add(i);
    });
    return {kind: "free text", concept: null, hits: hits, unknown: unknown, auc: null, text: null,
            source: "the caption words " + kept.map(function (t) { return "'" + t + "'"; }).join(", ") +
                    " (every one, as a word)"};
  }
  function wilson(h, n, z) {
    if (n <= 0) return [null, null];
    var p = Math.min(Math.max(h / n, 0), 1), centre = p + z * z / (2 * n);
    var spread = z * Math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)), scale = 1 + z * z / n;
    return [Math.min(Math.max((centre - spread) / scale, 0), 1), Math.min(Math.max((centre + spread) / scale, 0), 1)];
  }
  function rank(index, query) {
    var rows = index.top.map(function (top, unit) {
      var n = 0, h = 0;
      top.forEach(function (i) { if (query.unknown.has(i)) return; n += 1; if (query.hits.has(i)) h += 1; });
      var ci = wilson(h, n, index.z);
      return {unit: unit, share: n ? h / n : null, low: ci[0], high: ci[1],
              auc: query.auc ? query.auc[unit] : null, text: query.text ? query.text[unit] : null};
    });
    function key(v) { return v === null || v === undefined ? -Infinity : v; }
    rows.sort(function (a, b) {
      return (key(b.low) - key(a.low)) || (key(b.share) - key(a.share)) ||
             (query.kind === "concept" ? key(b.auc) - key(a.auc) : 0) || (a.unit - b.unit);
    });
    return rows;
  }
  function cell(tag, text, cls) {
    var el = document.createElement(tag);
    el.textContent = text;
    if (cls) el.className = cls;
    return el;
  }
  function fmt(v, digits) { return v === null || v === undefined ? "–" : v.toFixed(digits); }
  function show(layer, q) {
    var index = window.neurolensFind && window.neurolensFind[layer.id];
    var section = document.createElement("section");
    section.className = "card find-layer";
    section.dataset.layer = layer.id;
    section.appendChild(cell("h2", layer.title));
    if (!index) {
      section.appendChild(cell("p", "No concept audit of this layer in the cache: run `neurolens describe` on it.",
                               "muted"));
      results.appendChild(section);
      return 0;
    }
    var query = parse(index, q), rows = rank(index, query);
    section.dataset.kind = query.kind;
    var what = query.kind === "concept" ? "concept " + query.concept :
               query.kind === "lexicon" ? "a lexicon word of " + query.concept : "free text";
    section.appendChild(cell("p", "'" + q.trim() + "': " + what + "; captions matched by " + query.source + ".",
                             "muted small"));
    var table = document.createElement("table");
    table.className = "find-table";
    var head = document.createElement("tr");
    ["#", layer.unit_word, "", "share of top images", "95% interval", "text score (model-based)",
     "flagged for"].forEach(function (t) { head.appendChild(cell("th", t)); });
    table.appendChild(head);
    rows.slice(0, SHOW).forEach(function (r, i) {
      var tr = document.createElement("tr");
      tr.dataset.unit = r.unit;
      tr.dataset.share = r.share === null ? "" : r.share;
      tr.dataset.low = r.low === null ? "" : r.low;
      tr.appendChild(cell("td", String(i + 1)));
      var link = document.createElement("a");
      link.href = "L/" + encodeURIComponent(layer.id) + "/u/" + r.unit + ".html";
      link.textContent = layer.unit_word + " " + r.unit;
      var td = document.createElement("td"); td.appendChild(link); tr.appendChild(td);
      var thumb = document.createElement("td");
      if (layer.crops) {
        var img = document.createElement("img");
        img.className = "find-thumb"; img.loading = "lazy"; img.width = 48; img.height = 48;
        img.alt = layer.unit_word + " " + r.unit + " (blurred)";
        img.src = "img/" + encodeURIComponent(layer.id) + "/tile/" + r.unit + ".jpg";
        thumb.appendChild(img);
      }
      tr.appendChild(thumb);
      tr.appendChild(cell("td", fmt(r.share, 2), "num"));
      tr.appendChild(cell("td", r.low === null ? "–" : "[" + fmt(r.low, 2) + ", " + fmt(r.high, 2) + "]", "num"));
      tr.appendChild(cell("td", r.text === null || r.text === undefined ? "–" : (r.text >= 0 ? "+" : "") +
                                r.text.toFixed(3), "num model-based"));
      tr.appendChild(cell("td", (index.flags[r.unit] || []).map(function (k) {
        return index.concepts[k].name; }).join(" + ") || "–"));
      table.appendChild(tr);
    });
    section.appendChild(table);
    results.appendChild(section);
    return rows.length;
  }
  function run() {
    var q = qBox.value.trim();
    results.textContent = "";
    countBox.textContent = "";
    if (!q) return;
    var chosen = data.layers.filter(function (l) { return !layerBox.value || l.id === layerBox.value; });
    var pending = chosen.length;
    if (!pending) { countBox.textContent = "no such layer"; return; }
    chosen.forEach(function (layer) {
      load(layer, function () {
        pending -= 1;
        if (pending === 0) {
          chosen.forEach(function (l) { show(l, q); });
          countBox.textContent = "top " + SHOW + " per layer";
          document.body.dataset.ready = "1";
        }
      });
    });
  }
  var params = new URLSearchParams(location.search);
  qBox.value = params.get("q") || "";
  layerBox.value = params.get("layer") || "";
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var next = new URLSearchParams();
    next.set("q", qBox.value);
    if (layerBox.value) next.set("layer", layerBox.value);
    history.replaceState(null, "", "?" + next.toString());
    run();
  });
  run();
})();
