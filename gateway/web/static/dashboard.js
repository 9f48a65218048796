// dicom-gateway dashboard: refresh the server-rendered tables in place, Retry buttons as fetch calls.
// Plain JavaScript, no dependencies, nothing loaded from the network but this gateway.
(function () {
  "use strict";
  var main = document.getElementById("dashboard");
  var live = document.getElementById("live");
  var message = document.getElementById("message");
  var every = 1000 * (parseFloat(live && live.dataset.refresh) || 5);
  var busy = false;

  function say(text, bad) {
    message.textContent = text;
    message.className = bad ? "bad" : "";
  }

  function refresh() {
    if (busy) return Promise.resolve();
    busy = true;
    return fetch("/dashboard/fragment", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        main.innerHTML = html;
        live.textContent = "live";
        live.className = "ok";
      })
      .catch(function (err) {
        live.textContent = "not updating (" + err.message + ")";
        live.className = "bad";
      })
      .then(function () { busy = false; });
  }

  main.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList.contains("retry")) return;
    event.preventDefault();
    var button = form.querySelector("button");
    if (button) button.disabled = true;
    fetch(form.getAttribute("action"), { method: "POST", credentials: "same-origin" })
      .then(function (r) {
        return r.json().then(function (body) { return { ok: r.ok, body: body }; });
      })
      .then(function (res) {
        if (!res.ok) {
          say("Retry refused: " + (res.body.detail || "unknown reason"), true);
        } else if (res.body.retried !== undefined) {
          say(res.body.retried + " item(s) back to pending");
        } else {
          say("item " + res.body.id + " is " + res.body.state);
        }
        return refresh();
      })
      .catch(function (err) { say("Retry failed: " + err.message, true); });
  });

  setInterval(refresh, every);
})();
