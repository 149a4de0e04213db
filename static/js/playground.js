// The playground page: each panel streams its generation's text over /ws/generations/<id>/ and has a
// Stop button; the form's chat checkbox follows the chosen job (or base model).
//
// Events (see webapp/playground/events.py): "snapshot" on connect (status, the text so far and the
// tokens it covers), "status", "token" ({text, offset, token_count, previous_count}: the text becomes
// its first `offset` characters + `text`) and "done" (final status, whole text, error message).
// A token event the snapshot already covers is skipped; one that does not follow the text shown
// means an event was lost, and the panel asks for a new snapshot. All text goes in with textContent.
(function () {
  "use strict";

  const FINISHED = new Set(["succeeded", "failed", "stopped"]);
  const REFUSALS = {
    4401: "You are not logged in any more: log in again, then reload this page.",
    4404: "This generation is not yours or no longer exists.",
  };
  const RECONNECT_DELAY_MS = 1000;
  const MAX_RESYNCS = 3;

  function socketUrl(path) {
    return (window.location.protocol === "https:" ? "wss://" : "ws://") + window.location.host + path;
  }

  function watch(panel) {
    const output = panel.querySelector("[data-role=output]");
    const badge = panel.querySelector("[data-role=status]");
    const tokens = panel.querySelector("[data-role=tokens]");
    const errorBox = panel.querySelector("[data-role=error]");
    const note = panel.querySelector("[data-role=connection]");
    const stopForm = panel.querySelector("[data-role=stop]");
    const stopping = panel.querySelector("[data-role=stopping]");
    let text = output.textContent;
    let tokenCount = null; // the tokens `text` covers; known from the first snapshot on
    let finished = FINISHED.has(panel.dataset.status);
    let current = null; // the socket whose events count
    let reconnectsLeft = 1;
    let resyncsLeft = MAX_RESYNCS;

    // The panel's badge, and the generation's in the list of recent comparisons.
    const badges = [badge].concat(Array.from(
      document.querySelectorAll("#history [data-history-of='" + panel.dataset.generation + "']")));

    function setStatus(status) {
      panel.dataset.status = status;
      badges.forEach(function (each) {
        each.textContent = status;
        each.className = "status status-" + status;
      });
      if (FINISHED.has(status)) {
        stopForm.hidden = true;
        stopping.hidden = true;
      }
    }

    function setStopRequested(requested) {
      if (requested && !finished) {
        stopForm.hidden = true;
        stopping.hidden = false;
      }
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

    // Another snapshot replaces what this socket missed: close it and connect again at once.
    function resync(socket) {
      if (resyncsLeft <= 0) {
        setNote("Live updates lost text: reload the page to see the stored answer.", true);
        return;
      }
      resyncsLeft -= 1;
      current = null;
      socket.close(1000);
      connect();
    }

    function applyToken(event, socket) {
      if (tokenCount === null || !Number.isInteger(event.token_count) || event.token_count <= tokenCount) {
        return; // already in the snapshot
      }
      const offset = event.offset;
      if (event.previous_count !== tokenCount || !Number.isInteger(offset) || offset > text.length) {
        resync(socket);
        return;
      }
      setText(text.slice(0, offset) + (typeof event.text === "string" ? event.text : ""));
      tokenCount = event.token_count;
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
      current = null;
      socket.close(1000);
    }

    function handle(event, socket) {
      switch (event.type) {
        case "snapshot":
          setText(event.text || "");
          tokenCount = Number.isInteger(event.token_count) ? event.token_count : 0;
          setError(event.error_message);
          if (FINISHED.has(event.status)) {
            finish(event, socket);
          } else {
            setStatus(event.status);
            setStopRequested(event.stop_requested);
          }
          break;
        case "status":
          setStatus(event.status);
          setStopRequested(event.stop_requested);
          break;
        case "token":
          applyToken(event, socket);
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
      current = socket;
      tokenCount = null;
      socket.addEventListener("open", function () {
        setNote("");
      });
      socket.addEventListener("message", function (message) {
        if (socket !== current || finished) {
          return;
        }
        let event;
        try {
          event = JSON.parse(message.data);
        } catch (error) {
          return;
        }
        handle(event, socket);
      });
      socket.addEventListener("close", function (closing) {
        if (finished || socket !== current) {
          return;
        }
        current = null;
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

    // The Stop button asks without leaving the page; the socket then brings the end.
    stopForm.addEventListener("submit", function (submitting) {
      submitting.preventDefault();
      stopForm.hidden = true;
      window.fetch(stopForm.action, {
        method: "POST",
        body: new FormData(stopForm),
        headers: {Accept: "application/json"},
        credentials: "same-origin",
      }).then(function (response) {
        return response.json().catch(function () {
          return {};
        }).then(function (answer) {
          if (!response.ok) {
            setNote(answer.error || "Could not stop it.", true);
          } else if (!FINISHED.has(answer.status)) {
            setStopRequested(true);
          }
        });
      }).catch(function () {
        stopForm.hidden = false;
        setNote("Could not reach the server to stop it; try again.", true);
      });
    });

    if (!finished) {
      connect();
    }
  }

  // The chat checkbox follows the chosen job (how it trained) or base model (its tokenizer).
  function followPromptFormat() {
    const jobSelect = document.getElementById("id_job");
    const modelSelect = document.getElementById("id_base_model");
    const chatBox = document.getElementById("id_chat");
    const hint = document.getElementById("chat-hint");
    if (!jobSelect || !chatBox || !hint) {
      return;
    }

    function chosenOption() {
      if (jobSelect.value) {
        return jobSelect.selectedOptions[0];
      }
      return modelSelect ? modelSelect.selectedOptions[0] : null;
    }

    function showHint(option) {
      hint.textContent = option && option.dataset.chatHint ? "Default: " + option.dataset.chatHint : "";
    }

    function follow() {
      const option = chosenOption();
      if (option && option.dataset.chat) {
        chatBox.checked = option.dataset.chat === "true";
      }
      showHint(option);
    }

    jobSelect.addEventListener("change", follow);
    lockModelToJob(jobSelect, modelSelect);
    if (modelSelect) {
      modelSelect.addEventListener("change", function () {
        if (!jobSelect.value) {
          follow();
        }
      });
    }
    showHint(chosenOption()); // the checkbox keeps what the page was given
  }

  // An adapter runs only on the base model its job trained on: while a job is chosen the base model field
  // shows that model and cannot be changed (a disabled field is not sent; the server takes the job's model,
  // and refuses another one). Choosing "Base model only" again gives back the model chosen before.
  function lockModelToJob(jobSelect, modelSelect) {
    const source = document.getElementById("job-models");
    if (!modelSelect || !source) {
      return;
    }
    const jobModels = JSON.parse(source.textContent);
    let ownChoice = modelSelect.value;

    function lock() {
      const model = jobSelect.value ? jobModels[jobSelect.value] : undefined;
      modelSelect.querySelectorAll("option[data-job-model]").forEach(function (option) {
        option.remove();
      });
      if (model === undefined) {
        if (modelSelect.disabled) {
          modelSelect.disabled = false;
          modelSelect.value = ownChoice;
        }
        modelSelect.removeAttribute("title");
        return;
      }
      if (!modelSelect.disabled) {
        ownChoice = modelSelect.value;
      }
      // A job's model no healthy trunk serves is not among the choices: shown all the same (the server
      // then says that no trunk serves it).
      if (!Array.from(modelSelect.options).some(function (option) { return option.value === model; })) {
        const option = new Option(model, model);
        option.dataset.jobModel = "true";
        modelSelect.add(option);
      }
      modelSelect.value = model;
      modelSelect.disabled = true;
      modelSelect.title = "The adapter runs only on " + model + ", the model its job trained on.";
    }

    jobSelect.addEventListener("change", lock);
    lock();
  }

  if (typeof WebSocket !== "undefined") {
    document.querySelectorAll(".panel[data-socket-path]").forEach(watch);
  }
  followPromptFormat();
})();
