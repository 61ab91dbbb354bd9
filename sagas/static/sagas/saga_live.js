/* Sagas live: polls GET /api/sagas/live/?after=<cursor> every POLL_MS (live_poll.js)
 * and redraws the fleet: sagas in flight, last-minute rates, FAILED sagas waiting
 * for an operator, and the stream of transitions (newest first, each id once). */
(function () {
  "use strict";

  var POLL_MS = 1000;
  var BACKOFF_MAX_MS = 10000;
  var MAX_EVENTS = 300;
  var WORDS = {
    started: "started", step_done: "step done", called_out: "called out", retrying: "retrying",
    completed: "completed", compensating: "compensating", undone: "undone",
    compensated: "compensated", failed: "FAILED", ignored: "ignored copy",
    redelivered: "redelivered", operator: "operator"
  };

  var el = window.BacktrackLive.el;

  function row(cells, numeric) {
    var tr = el("tr");
    cells.forEach(function (value, i) { tr.appendChild(el("td", i >= numeric ? "num" : "", value)); });
    return tr;
  }

  function emptyRow(columns, text) {
    var tr = el("tr", "live-empty");
    var td = el("td", "", text);
    td.colSpan = columns;
    tr.appendChild(td);
    return tr;
  }

  function start(root) {
    var seen = new Map();  // event id -> status shown (a started row changes later)
    var cursor = null;
    var note = document.getElementById("live-note");
    var events = document.getElementById("live-events");

    function link(sagaId, text) {
      var a = el("a", "", text);
      a.href = root.dataset.changeUrl.replace("00000000-0000-0000-0000-000000000000", sagaId);
      return a;
    }

    function drawInFlight(items) {
      var body = document.querySelector("#live-in-flight tbody");
      body.replaceChildren();
      items.forEach(function (item) {
        body.appendChild(row([item.saga_type, item.status, item.step || "\u2014", item.count], 3));
      });
      if (!items.length) body.appendChild(emptyRow(4, "nothing in flight"));
    }

    function drawRates(rates) {
      var body = document.querySelector("#live-rates tbody");
      body.replaceChildren();
      Object.keys(rates).sort().forEach(function (type) {
        var r = rates[type];
        body.appendChild(row([type, r.started, r.completed, r.compensated, r.failed], 1));
      });
    }

    function drawAwaiting(awaiting) {
      var badge = document.getElementById("live-awaiting-count");
      badge.textContent = awaiting.count > 1000 ? "1000+" : awaiting.count;
      badge.dataset.count = String(awaiting.count);
      var list = document.getElementById("live-awaiting");
      list.replaceChildren();
      awaiting.sagas.forEach(function (saga) {
        var item = el("li");
        item.dataset.sagaId = saga.id;
        item.appendChild(link(saga.id, saga.id.slice(0, 8)));
        item.appendChild(document.createTextNode(" " + saga.saga_type + " \u00b7 " + saga.reason));
        list.appendChild(item);
      });
      if (!awaiting.sagas.length) list.appendChild(el("li", "live-empty", "none"));
    }

    function addEvents(items) {
      items.forEach(function (event) {
        if (seen.get(event.id) === event.status) return;
        seen.set(event.id, event.status);
        var item = el("li", "ev-" + event.kind);
        item.dataset.kind = event.kind;
        item.dataset.sagaId = event.saga_id;
        item.dataset.step = event.step;
        item.appendChild(el("span", "ev-kind", WORDS[event.kind] || event.kind));
        item.appendChild(document.createTextNode(new Date(event.at).toLocaleTimeString() + " "));
        item.appendChild(link(event.saga_id, event.saga_id.slice(0, 8)));
        item.appendChild(document.createTextNode(
          " " + event.saga_type + ": " + event.step + " (" + event.phase + ") " + event.status +
          (event.attempt > 1 ? ", attempt " + event.attempt : "")));
        events.insertBefore(item, events.firstChild);
      });
      while (events.children.length > MAX_EVENTS) events.removeChild(events.lastChild);
    }

    window.BacktrackLive.poll({
      url: function () {
        return root.dataset.feedUrl + (cursor === null ? "" : "?after=" + encodeURIComponent(cursor));
      },
      every: POLL_MS,
      backoffMax: BACKOFF_MAX_MS,
      answer: function (answer) {
        cursor = answer.cursor;
        drawInFlight(answer.in_flight);
        drawRates(answer.rates_per_minute);
        drawAwaiting(answer.awaiting_operator);
        addEvents(answer.events);
        root.dataset.live = "true";
        root.dataset.polls = String(Number(root.dataset.polls || 0) + 1);
        note.textContent = "live, updated " + new Date().toLocaleTimeString();
      },
      refused: function (status) {
        root.dataset.live = "false";
        note.textContent = "the feed refused (HTTP " + status + "); reload the page";
      },
      failed: function (error) {
        root.dataset.live = "false";
        note.textContent = "feed unavailable (" + error.message + "); retrying";
      }
    }).start(0);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("saga-live-page");
    if (root) start(root);
  });
})();
