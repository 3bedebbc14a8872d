// Domum Gateway public pages: small progressive enhancements only. Every page works
// without this file (times are shown in UTC, commands can be selected by hand).
(function () {
  "use strict";

  function localText(date) {
    try {
      return new Intl.DateTimeFormat(undefined, {
        year: "numeric", month: "short", day: "numeric",
        hour: "2-digit", minute: "2-digit", timeZoneName: "short"
      }).format(date);
    } catch (e) {
      return date.toString();
    }
  }

  // <time datetime="...Z" data-local> gets the reader's local time next to the UTC one.
  function showLocalTimes() {
    var nodes = document.querySelectorAll("time[data-local]");
    for (var i = 0; i < nodes.length; i++) {
      var date = new Date(nodes[i].getAttribute("datetime"));
      if (isNaN(date.getTime())) continue;
      var span = document.createElement("span");
      span.className = "local-time";
      span.textContent = "your time: " + localText(date);
      nodes[i].parentNode.insertBefore(span, nodes[i].nextSibling);
    }
  }

  function formatLeft(ms) {
    var total = Math.max(0, Math.floor(ms / 1000));
    var d = Math.floor(total / 86400), h = Math.floor((total % 86400) / 3600);
    var m = Math.floor((total % 3600) / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min";
    return "less than a minute";
  }

  // [data-countdown] counts down to its end and reloads the page when it is reached
  // (the server then shows that the access has ended).
  function startCountdowns() {
    var nodes = document.querySelectorAll("[data-countdown]");
    if (!nodes.length) return;
    function tick() {
      var now = Date.now();
      for (var i = 0; i < nodes.length; i++) {
        var end = new Date(nodes[i].getAttribute("data-countdown")).getTime();
        if (isNaN(end)) continue;
        if (end - now <= 0) { window.location.reload(); return; }
        nodes[i].textContent = formatLeft(end - now);
      }
    }
    tick();
    window.setInterval(tick, 15000);
  }

  function enableCopyButtons() {
    if (!navigator.clipboard) return;
    var buttons = document.querySelectorAll("button[data-copy]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].hidden = false;
      buttons[i].addEventListener("click", function (event) {
        var button = event.currentTarget;
        navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
          button.textContent = "Copied";
          window.setTimeout(function () { button.textContent = "Copy"; }, 1500);
        });
      });
    }
  }

  // A double click on "Send token" must not send two tokens (the second replaces the first).
  function guardForms() {
    var forms = document.querySelectorAll("form[method=post]");
    for (var i = 0; i < forms.length; i++) {
      forms[i].addEventListener("submit", function (event) {
        var form = event.currentTarget;
        if (form.getAttribute("data-sent")) { event.preventDefault(); return; }
        form.setAttribute("data-sent", "1");
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    showLocalTimes();
    startCountdowns();
    enableCopyButtons();
    guardForms();
  });
})();
