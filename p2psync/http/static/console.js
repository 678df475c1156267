// p2psync console: keeps the part of a page marked data-live up to date from the
// agent's event stream (/events), without a manual refresh. The page is fetched
// again and its live part swapped in, a moment after the events of the kinds it
// lists; while a field or button in it has the focus (someone is filling in a
// form, or moving through it by keyboard) nothing is swapped, and a part that did
// not change is left alone.
(function () {
  "use strict";
  var live = document.querySelector("[data-live]");
  var status = document.getElementById("live-status");
  if (!live || !window.EventSource) { return; }
  var kinds = (live.getAttribute("data-live") || "").split(" ");
  var timer = null;

  function say(text) { if (status) { status.textContent = text; } }

  function busy() {
    var active = document.activeElement;
    return active && active !== live && live.contains(active) &&
      /^(INPUT|SELECT|TEXTAREA|BUTTON|A)$/.test(active.tagName);
  }

  function refresh() {
    timer = null;
    if (busy()) { timer = setTimeout(refresh, 2000); return; }
    fetch(window.location.href, {
      credentials: "same-origin", cache: "no-store", headers: { "X-Console-Live": "1" }
    })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-live]");
        if (fresh && !busy()) {
          if (fresh.innerHTML !== live.innerHTML) {
            live.innerHTML = fresh.innerHTML;
          }
        } else if (fresh) {
          timer = setTimeout(refresh, 2000);
        }
      })
      .catch(function () { say("Could not reach the agent; retrying"); });
    // (each update is not announced: a screen reader would read it out every time)
  }

  var events = new EventSource("/events");
  events.addEventListener("hello", function () { say("Live"); });
  kinds.forEach(function (kind) {
    events.addEventListener(kind, function () {
      if (timer === null) { timer = setTimeout(refresh, 150); }
    });
  });
  events.onerror = function () { say("Connection to the agent lost; reconnecting"); };
})();
