/* The saga graph: drawn from the `graph` of GET /api/sagas/<id>/ and kept live.
 *
 * An element with data-saga-graph holds the first answer (a json_script id in
 * data-graph-json) and the feed URL. While the saga runs, the page polls
 * `<feed>?after=<cursor>` every POLL_MS (live_poll.js), redraws the graph and
 * lists the new log rows; it stops once the saga has ended.
 */
(function () {
  "use strict";

  var POLL_MS = 500;
  var BACKOFF_MAX_MS = 8000;

  var el = window.BacktrackLive.el;

  function ms(value) {
    if (value === null || value === undefined) return "";
    if (value < 1000) return value + " ms";
    if (value < 60000) return (value / 1000).toFixed(2) + " s";
    return Math.floor(value / 60000) + " min " + Math.round((value % 60000) / 1000) + " s";
  }

  function cell(data, phase, number) {
    if (!data) return el("div", "tl-cell tl-none", "no compensation");
    var box = el("div", "tl-cell tl-" + data.state + (data.failing ? " tl-failing" : ""));
    box.dataset.phase = phase;
    box.dataset.step = data.name;
    box.dataset.state = data.state;
    box.dataset.attempts = data.attempts;
    if (data.failing) box.dataset.failing = "true";
    if (data.duplicates) box.dataset.duplicates = data.duplicates;
    var prefix = phase === "action" ? number + ". " : data.order ? "#" + data.order + " " : "";
    box.appendChild(el("div", "tl-name", prefix + data.name));
    box.appendChild(el("div", "tl-state", data.label));
    var meta = [];
    if (data.attempts > 1) meta.push(data.attempts + " attempts");
    if (data.retries) meta.push(data.retries + (data.retries === 1 ? " retry" : " retries"));
    if (data.duration_ms !== null && data.finished_at) meta.push(ms(data.duration_ms));
    if (meta.length) box.appendChild(el("div", "tl-meta", meta.join(" \u00b7 ")));
    if (data.duplicates) {
      var dup = data.duplicates + " duplicate deliver" + (data.duplicates === 1 ? "y" : "ies") + " ignored";
      box.appendChild(el("div", "tl-dup", dup));
    }
    if (data.redelivered) {
      box.appendChild(el("div", "tl-dup", data.redelivered + " redelivered (worker lost)"));
    }
    if (data.healed) box.appendChild(el("div", "tl-healed", "healed"));
    if (data.failing) {
      box.appendChild(el("div", "tl-flag", phase === "action" ? "\u2717 failing step" : "\u2717 compensation failed"));
    }
    return box;
  }

  function arrow(symbol, on) {
    return el("div", "tl-arrow" + (on ? " on" : ""), symbol);
  }

  // One lane of the graph: its label, then for each step an arrow from the
  // previous one (none before the first) and the node ``node(step)`` draws.
  function lane(className, label, steps, arrowOf, node) {
    var row = el("div", "tl-row " + className);
    row.appendChild(el("div", "tl-lane", label));
    steps.forEach(function (step, i) {
      if (i) row.appendChild(arrowOf(step));
      row.appendChild(node(step, i));
    });
    return row;
  }

  function turn(step) {
    var spacer = el("div", "tl-spacer tl-turn");
    if (step.turn) {
      spacer.appendChild(document.createTextNode("\u2193 "));
      spacer.appendChild(el("small", "", "undo from here"));
    }
    return spacer;
  }

  function draw(container, graph) {
    var frag = document.createDocumentFragment();
    frag.appendChild(lane("tl-actions", "Actions \u2192", graph.steps,
      function (step) { return arrow("\u2192", step.flows_right); },
      function (step, i) { return cell(step.action, "action", i + 1); }));
    if (graph.compensating) {
      frag.appendChild(lane("tl-turns", "", graph.steps,
        function () { return arrow("", false); }, turn));
      frag.appendChild(lane("tl-compensations", "\u2190 Compensations", graph.steps,
        function (step) { return arrow("\u2190", step.flows_left); },
        function (step, i) { return cell(step.compensation, "compensation", i + 1); }));
    }
    var notes = [];
    if (graph.failing_action) notes.push("Failing step: " + graph.failing_action + ".");
    if (graph.failing_compensation) {
      notes.push("Compensation that exhausted its retries: " + graph.failing_compensation + ".");
    }
    if (graph.resolved) notes.push("Settled by hand by an operator.");
    if (graph.notes) notes.push(graph.notes + " operator note" + (graph.notes === 1 ? "" : "s") + " in the log below.");
    container.replaceChildren(frag);
    if (notes.length) container.appendChild(el("p", "tl-notes", notes.join(" ")));
  }

  function describeRow(row) {
    var what = row.phase === "operator" ? "operator note" : row.step + " (" + row.phase + ")";
    return what + ": " + row.status + (row.attempt > 1 ? ", attempt " + row.attempt : "") +
      (row.duration_ms ? ", " + ms(row.duration_ms) : "");
  }

  function follow(root) {
    var graphBox = root.querySelector(".tl-graph");
    var status = root.querySelector(".live-status");
    var note = root.querySelector(".live-note");
    var now = root.querySelector(".live-now");
    var live = root.querySelector(".saga-live");
    var events = root.querySelector(".saga-events");
    var items = new Map();  // log row id -> its list item (a started row changes later)
    var known = new Map();  // rows the page listed when it loaded: id -> status
    (root.dataset.seen || "").split(" ").filter(Boolean).forEach(function (pair) {
      var parts = pair.split(":");
      known.set(Number(parts[0]), parts[1]);
    });
    var cursor = root.dataset.cursor;

    function show(graph, sagaStatus) {
      root.dataset.status = sagaStatus;
      status.textContent = sagaStatus;
      // The page's title names the status too (the fields below stay as loaded).
      document.querySelectorAll("[data-live-status]").forEach(function (node) {
        node.textContent = sagaStatus;
      });
      if (graph) {
        draw(graphBox, graph);
        now.textContent = graph.step_now ? "now: " + graph.step_now : "";
      }
    }

    function stop(text) {
      live.dataset.live = "false";
      root.dataset.live = "false";
      note.textContent = text;
    }

    function append(rows) {
      rows.forEach(function (row) {
        var item = items.get(row.id);
        if (item && item.dataset.status === row.status) return;
        if (!item && known.get(row.id) === row.status) return;  // in the log already
        if (!item) {
          item = el("li");
          items.set(row.id, item);
          events.appendChild(item);
        }
        item.dataset.status = row.status;
        item.replaceChildren(
          el("span", "ev-kind", new Date(row.finished_at).toLocaleTimeString()),
          document.createTextNode(describeRow(row)));
        events.scrollTop = events.scrollHeight;
      });
    }

    var feed = window.BacktrackLive.poll({
      url: function () { return root.dataset.feedUrl + "?after=" + encodeURIComponent(cursor); },
      every: POLL_MS,
      backoffMax: BACKOFF_MAX_MS,
      answer: function (answer) {
        cursor = answer.cursor;
        show(answer.graph, answer.status);
        append(answer.log);
        root.dataset.polls = String(Number(root.dataset.polls || 0) + 1);
        if (answer.graph && answer.graph.terminal) {
          stop("ended; reload the page for the whole log");
          return false;
        }
        note.textContent = "updating live";
        return true;
      },
      refused: function (status) {
        stop("the feed refused (HTTP " + status + "); reload the page");
      },
      failed: function (error) {
        note.textContent = "feed unavailable (" + error.message + "); retrying";
      }
    });

    var first = JSON.parse(document.getElementById(root.dataset.graphJson).textContent);
    show(first, first.status);
    if (first.terminal || root.dataset.follow !== "true") {
      stop(first.terminal ? "ended" : "");
    } else {
      live.dataset.live = "true";
      root.dataset.live = "true";
      note.textContent = "updating live";
      feed.start(POLL_MS);
    }
  }

  window.BacktrackSagaGraph = { draw: draw, follow: follow };
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-saga-graph]").forEach(follow);
  });
})();
