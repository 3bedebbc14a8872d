// Domum Gateway admin console: small progressive enhancements. Every page works without it;
// the server checks everything this script helps with.
"use strict";

(function () {
  // Focus the error summary so keyboard and screen-reader users land on what to fix.
  function focusErrors() {
    var summary = document.querySelector("[data-autofocus]");
    if (summary) { summary.focus(); }
  }

  // Wizard: the user select lists only the users of the chosen group.
  function filterUsers() {
    var groups = document.querySelectorAll("select[data-filters]");
    groups.forEach(function (groupSelect) {
      var users = document.getElementById(groupSelect.getAttribute("data-filters"));
      if (!users) { return; }
      var placeholder = users.querySelector("option[value='']");
      var all = Array.prototype.slice.call(users.querySelectorAll("optgroup"));
      function apply() {
        var chosen = groupSelect.value;
        var keep = users.value;
        while (users.firstChild) { users.removeChild(users.firstChild); }
        if (placeholder) { users.appendChild(placeholder); }
        var stillThere = false;
        all.forEach(function (og) {
          if (!chosen || og.getAttribute("data-group") === chosen) {
            users.appendChild(og);
            if (og.querySelector("option[value='" + CSS.escape(keep) + "']")) { stillThere = true; }
          }
        });
        users.value = stillThere ? keep : "";
        users.disabled = !chosen;
      }
      groupSelect.addEventListener("change", apply);
      apply();
    });
  }

  // Wizard: show the duration fields or the custom end, whichever is chosen.
  function modePanels() {
    var radios = document.querySelectorAll("input[name='mode']");
    if (!radios.length) { return; }
    function apply() {
      var mode = (document.querySelector("input[name='mode']:checked") || {}).value || "duration";
      document.querySelectorAll("[data-mode]").forEach(function (panel) {
        panel.hidden = panel.getAttribute("data-mode") !== mode;
      });
    }
    radios.forEach(function (r) { r.addEventListener("change", apply); });
    apply();
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function formatOffset(minutes) {
    var sign = minutes < 0 ? "-" : "+";
    var abs = Math.abs(minutes);
    return sign + pad(Math.floor(abs / 60)) + ":" + pad(abs % 60);
  }

  // Wizard: on the first visit to the limitation step, offer the browser's own UTC offset
  // and show the suggested start (prepared in UTC by the server) in that offset.
  function browserOffset() {
    var form = document.querySelector("form[data-tz-auto='1']");
    if (!form) { return; }
    var flag = document.getElementById("h-f-tz-auto");
    var tz = document.getElementById("f-tz");
    if (flag) { flag.value = "0"; }
    if (!tz) { return; }
    var offset = -new Date().getTimezoneOffset();
    var value = formatOffset(offset);
    if (offset === 0 || !tz.querySelector("option[value='" + value + "']")) { return; }
    [["f-start-date", "f-start-time"], ["f-end-date", "f-end-time"]].forEach(function (pair) {
      var d = document.getElementById(pair[0]);
      var t = document.getElementById(pair[1]);
      if (!d || !t || !d.value || !t.value) { return; }
      var utc = Date.parse(d.value + "T" + t.value + ":00Z");
      if (isNaN(utc)) { return; }
      var local = new Date(utc + offset * 60000);
      d.value = local.getUTCFullYear() + "-" + pad(local.getUTCMonth() + 1) + "-" + pad(local.getUTCDate());
      t.value = pad(local.getUTCHours()) + ":" + pad(local.getUTCMinutes());
    });
    tz.value = value;
  }

  // Targets: show only the fields that matter for the chosen protocol.
  function protocolFields() {
    var select = document.querySelector("select[data-protocol-switch]");
    if (!select) { return; }
    function apply() {
      document.querySelectorAll("[data-protocols]").forEach(function (el) {
        el.hidden = el.getAttribute("data-protocols").split(" ").indexOf(select.value) < 0;
      });
    }
    select.addEventListener("change", apply);
    apply();
  }

  // Action menus: one open at a time; Escape or a click elsewhere closes them.
  function menus() {
    var all = document.querySelectorAll("details.menu");
    if (!all.length) { return; }
    all.forEach(function (menu) {
      menu.addEventListener("toggle", function () {
        if (!menu.open) { return; }
        all.forEach(function (other) { if (other !== menu) { other.open = false; } });
      });
    });
    document.addEventListener("keydown", function (e) {
      if (e.key !== "Escape") { return; }
      all.forEach(function (menu) {
        if (menu.open) { menu.open = false; menu.querySelector("summary").focus(); }
      });
    });
    document.addEventListener("click", function (e) {
      all.forEach(function (menu) { if (menu.open && !menu.contains(e.target)) { menu.open = false; } });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    filterUsers();
    modePanels();
    browserOffset();
    protocolFields();
    menus();
    focusErrors();
  });
})();
