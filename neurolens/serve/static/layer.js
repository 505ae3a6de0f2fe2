// Layer page: every unit (a neuron, or an SAE's feature) as a tile, rendered in pages as you scroll (fast at thousands of units).
// Sort by NSFW evidence (flagged units first) or by id, filter flagged units, filter by a concept of the layer's
// concept audit (the units flagged for it, those flagged for two or more concepts first, then by its AUC; or
// the units flagged for two or more concepts), search the top texts.
// Data comes from the JSON block on the page; text goes in with textContent only.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("units-data").textContent);
  var grid = document.getElementById("grid"), more = document.getElementById("more");
  var sortBox = document.getElementById("sort"), flaggedBox = document.getElementById("flagged");
  var conceptBox = document.getElementById("concept"), concepts = data.concepts;
  var searchBox = document.getElementById("search"), countBox = document.getElementById("count");
  var PAGE = 120, shown = 0, list = [];
  var root = "../../", evidenceName = data.evidence;
  var unitWord = data.unit_word || "unit", unitsWord = data.units_word || "units";   // "feature(s)" for an SAE
  var U = 0, FLAG = 1, EV = 2, SHARE = 3, FV = 4, TEXTS = 5;
  var rows = data.units.map(function (r) { r.search = r[TEXTS].join("\n").toLowerCase(); return r; });

  function readHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    sortBox.value = params.get("sort") || "evidence";
    if (!sortBox.value) sortBox.value = "evidence";   // an unknown sort in the hash: the default
    flaggedBox.checked = params.get("flagged") === "1";
    searchBox.value = params.get("q") || "";
    if (concepts) conceptBox.value = params.get("concept") || "";
  }
  function writeHash() {
    var params = new URLSearchParams();
    if (sortBox.value !== "evidence") params.set("sort", sortBox.value);
    if (flaggedBox.checked) params.set("flagged", "1");
    if (searchBox.value) params.set("q", searchBox.value);
    if (conceptBox.value) params.set("concept", conceptBox.value);
    var text = params.toString();
    history.replaceState(null, "", text ? "#" + text : location.pathname + location.search);
  }
  function evidenceKey(r) { return r[EV] === null ? -Infinity : r[EV]; }
  // a concept's AUC for the unit; "pairs": its best AUC among the concepts it is flagged for
  function conceptAuc(r, chosen) {
    var ks = chosen === "pairs" ? concepts.flags[r[U]] : [Number(chosen)], best = -Infinity;
    ks.forEach(function (k) { var v = concepts.auc[k][r[U]]; if (v !== null && v > best) best = v; });
    return best;
  }
  function compute() {
    var query = searchBox.value.trim().toLowerCase(), words = query ? query.split(/\s+/) : [];
    list = rows.filter(function (r) {
      if (flaggedBox.checked && !r[FLAG]) return false;
      for (var i = 0; i < words.length; i++) if (r.search.indexOf(words[i]) < 0) return false;
      return true;
    });
    var chosen = concepts ? conceptBox.value : "";
    if (chosen !== "") {
      list = list.filter(function (r) {
        var flags = concepts.flags[r[U]] || [];
        return chosen === "pairs" ? flags.length >= 2 : flags.indexOf(Number(chosen)) >= 0;
      });
      list.sort(function (a, b) {
        var fa = concepts.flags[a[U]].length >= 2 ? 1 : 0, fb = concepts.flags[b[U]].length >= 2 ? 1 : 0;
        return (fb - fa) || (conceptAuc(b, chosen) - conceptAuc(a, chosen)) || (a[U] - b[U]);
      });
    } else if (sortBox.value === "unit") list.sort(function (a, b) { return a[U] - b[U]; });
    else list.sort(function (a, b) {
      return (b[FLAG] - a[FLAG]) || (evidenceKey(b) - evidenceKey(a)) || (a[U] - b[U]);
    });
    countBox.textContent = list.length === rows.length ? rows.length + " " + unitsWord : list.length + " of " + rows.length + " " + unitsWord;
    grid.textContent = "";
    shown = 0;
    renderMore();
  }
  function label(r) {
    if (r[EV] === null) return "";
    return evidenceName === "AUC" ? "AUC " + r[EV].toFixed(2) : "r " + (r[EV] >= 0 ? "+" : "") + r[EV].toFixed(2);
  }
  function tile(r) {
    var a = document.createElement("a");
    a.className = "tile" + (r[FLAG] ? " flagged" : "") + (unitWord === "feature" ? " feature" : "");
    a.href = "u/" + r[U] + ".html";
    a.dataset.unit = r[U];
    a.dataset.flagged = r[FLAG];
    var tip = [];
    if (r[SHARE] !== null) tip.push(Math.round(100 * r[SHARE]) + "% of the top images NSFW");
    if (r[TEXTS].length) tip.push(r[TEXTS].join("\n"));
    if (tip.length) a.title = tip.join("\n");
    var thumb = document.createElement("div"); thumb.className = "thumbwrap";
    if (data.crops || r[FV]) {
      var img = document.createElement("img");
      img.className = "thumb"; img.loading = "lazy"; img.decoding = "async"; img.width = 112; img.height = 112;
      img.alt = unitWord + " " + r[U] + " (blurred)";
      img.src = root + "img/" + data.id + "/tile/" + r[U] + ".jpg";
      thumb.appendChild(img);
    } else {
      var none = document.createElement("div");
      none.className = "thumb none"; none.textContent = "no image cached";
      thumb.appendChild(none);
    }
    if (r[FLAG]) { var chip = document.createElement("span"); chip.className = "chip"; chip.textContent = "flagged"; thumb.appendChild(chip); }
    if (r[SHARE] !== null) {
      var share = document.createElement("span"), pct = Math.round(100 * r[SHARE]);
      share.className = "share"; share.style.width = pct + "%";
      share.title = pct + "% of the top images are NSFW";
      thumb.appendChild(share);
    }
    var meta = document.createElement("div"); meta.className = "meta";
    var uid = document.createElement("span"); uid.className = "uid"; uid.textContent = r[U];
    var ev = document.createElement("span"); ev.className = "ev"; ev.textContent = label(r);
    if (concepts && conceptBox.value !== "") {
      var auc = conceptAuc(r, conceptBox.value);
      ev.textContent = auc === -Infinity ? "" : "AUC " + auc.toFixed(2);
    }
    meta.appendChild(uid); meta.appendChild(ev);
    var cc = null;
    if (concepts && (concepts.flags[r[U]] || []).length) {
      var names = concepts.flags[r[U]].map(function (k) { return concepts.concepts[k].name; });
      cc = document.createElement("div"); cc.className = "concepts"; cc.textContent = names.join(" + ");
      a.dataset.concepts = names.join(",");
    }
    var txt = document.createElement("div"); txt.className = "txt"; txt.textContent = r[TEXTS][0] || "\u00a0";
    a.appendChild(thumb); a.appendChild(meta);
    if (cc) a.appendChild(cc);
    a.appendChild(txt);
    return a;
  }
  function renderMore() {
    var stop = Math.min(shown + PAGE, list.length), fragment = document.createDocumentFragment();
    for (var i = shown; i < stop; i++) fragment.appendChild(tile(list[i]));
    grid.appendChild(fragment);
    shown = stop;
    grid.dataset.shown = shown;
    more.textContent = shown < list.length ? "showing " + shown + " of " + list.length + " · scroll for more" : "";
    if (!window.__firstRender) window.__firstRender = performance.now();
  }
  var observer = new IntersectionObserver(function (entries) {
    if (entries[0].isIntersecting && shown < list.length) renderMore();
  }, { rootMargin: "800px" });
  observer.observe(more);
  var timer = null;
  function changed() { writeHash(); compute(); }
  sortBox.addEventListener("change", changed);
  flaggedBox.addEventListener("change", changed);
  conceptBox.addEventListener("change", changed);
  searchBox.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(changed, 120); });
  // the hash edited by hand, a link or the back button: the page follows it (writeHash's replaceState does not
  // fire hashchange, so the page's own changes do not come back here)
  window.addEventListener("hashchange", function () { readHash(); compute(); });
  readHash();
  compute();
})();
