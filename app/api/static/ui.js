// Live refresh: an element with data-live-url is re-fetched every 2 s and the part matching
// data-live-select is swapped in, until that part says data-terminal (a finished job).
(function () {
  function poll(el) {
    var url = el.getAttribute("data-live-url");
    var sel = el.getAttribute("data-live-select");
    var always = el.hasAttribute("data-live-always");
    function tick() {
      var cur = el.querySelector(sel);
      if (!always && cur && cur.hasAttribute("data-terminal")) return;
      fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}})
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.querySelector(sel);
          if (fresh && cur) cur.replaceWith(fresh);
          var now = el.querySelector(sel);
          if (always || !(now && now.hasAttribute("data-terminal"))) setTimeout(tick, 2000);
        })
        .catch(function () { setTimeout(tick, 5000); });
    }
    setTimeout(tick, 2000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-url]").forEach(poll);
  });
})();
