// Playground panels: each one streams its generation's text over /ws/generations/<id>/.
//
// Events (see webapp/playground/events.py): "snapshot" on connect (status and the text so far),
// "status", "token" ({text, offset}: the text becomes its first `offset` characters + `text`)
// and "done" (final status, whole text, error message). All text goes in with textContent.
(function () {
  "use strict";

  const FINISHED = new Set(["succeeded", "failed"]);
  const REFUSALS = {
    4401: "You are not logged in any more: log in again, then reload this page.",
    4404: "This generation is not yours or no longer exists.",
  };
  const RECONNECT_DELAY_MS = 1000;

  function socketUrl(path) {
    return (window.location.protocol === "https:" ? "wss://" : "ws://") + window.location.host + path;
  }

  function watch(panel) {
    const output = panel.querySelector("[data-role=output]");
    const badge = panel.querySelector("[data-role=status]");
    const tokens = panel.querySelector("[data-role=tokens]");
    const errorBox = panel.querySelector("[data-role=error]");
    const note = panel.querySelector("[data-role=connection]");
    let text = output.textContent;
    let finished = FINISHED.has(panel.dataset.status);
    let reconnectsLeft = 1;

    function setStatus(status) {
      panel.dataset.status = status;
      badge.textContent = status;
      badge.className = "status status-" + status;
    }

    function setText(value) {
      text = value;
      output.textContent = value;
    }

    function setError(message) {
      errorBox.textContent = message || "";
      errorBox.hidden = !message;
    }

    function setNote(message, isError) {
      note.textContent = message || "";
      note.className = isError ? "error" : "muted";
    }

    function applyToken(event) {
      const delta = typeof event.text === "string" ? event.text : "";
      const offset = Number.isInteger(event.offset) ? Math.min(event.offset, text.length) : text.length;
      if (delta && text.slice(offset, offset + delta.length) === delta) {
        return; // already in the snapshot
      }
      setText(text.slice(0, offset) + delta);
    }

    function finish(event, socket) {
      finished = true;
      setStatus(event.status);
      setText(event.text || "");
      setError(event.error_message);
      if (typeof event.token_count === "number") {
        tokens.textContent = event.token_count + (event.token_count === 1 ? " token" : " tokens");
      }
      setNote("");
      socket.close(1000);
    }

    function handle(event, socket) {
      switch (event.type) {
        case "snapshot":
          setText(event.text || "");
          setError(event.error_message);
          if (FINISHED.has(event.status)) {
            finish(event, socket);
          } else {
            setStatus(event.status);
          }
          break;
        case "status":
          setStatus(event.status);
          break;
        case "token":
          applyToken(event);
          break;
        case "done":
          finish(event, socket);
          break;
        default:
          break;
      }
    }

    function connect() {
      const socket = new WebSocket(socketUrl(panel.dataset.socketPath));
      socket.addEventListener("open", function () {
        setNote("");
      });
      socket.addEventListener("message", function (message) {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch (error) {
          return;
        }
        handle(event, socket);
      });
      socket.addEventListener("close", function (closing) {
        if (finished) {
          return;
        }
        if (REFUSALS[closing.code]) {
          setNote(REFUSALS[closing.code], true);
          return;
        }
        if (reconnectsLeft > 0) {
          reconnectsLeft -= 1;
          setNote("Connection lost; reconnecting…", false);
          window.setTimeout(connect, RECONNECT_DELAY_MS);
          return;
        }
        setNote("Live updates stopped: the connection dropped again. Reload the page to see the stored answer.", true);
      });
    }

    if (!finished) {
      connect();
    }
  }

  if (typeof WebSocket !== "undefined") {
    document.querySelectorAll(".panel[data-socket-path]").forEach(watch);
  }
})();
