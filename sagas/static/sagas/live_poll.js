/* What the live admin pages share: building DOM nodes and polling a JSON feed.
 *
 * BacktrackLive.poll asks `url()` for JSON one request at a time (the next
 * after the answer), `every` ms apart, doubling the wait up to `backoffMax`
 * while the feed fails; a hidden tab asks nothing until it is shown again. A
 * 4xx other than 429 (logged out, gone, not allowed) stops it: asking again
 * will not help. `answer(json)` returning false stops it too. Same origin,
 * session cookie: GETs need no CSRF token.
 */
(function () {
  "use strict";

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function whenVisible(callback) {
    if (!document.hidden) return callback();
    document.addEventListener("visibilitychange", function shown() {
      if (document.hidden) return;
      document.removeEventListener("visibilitychange", shown);
      callback();
    });
  }

  // options: url(), every, backoffMax, answer(json) -> false to stop,
  // refused(status), failed(error); start(firstDelay) begins.
  function poll(options) {
    var delay = options.every;

    function later(ms) {
      window.setTimeout(function () { whenVisible(ask); }, ms);
    }

    function ask() {
      fetch(options.url(), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (response.status >= 400 && response.status < 500 && response.status !== 429) {
            options.refused(response.status);
            return;
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json().then(function (json) {
            delay = options.every;
            if (options.answer(json) !== false) later(delay);
          });
        })
        .catch(function (error) {
          delay = Math.min(delay * 2, options.backoffMax);
          options.failed(error);
          later(delay);
        });
    }

    return { start: later };
  }

  window.BacktrackLive = { el: el, poll: poll };
})();
