// rankloop: send interactions from a page. Served by every serving worker at /sdk/rankloop.js.
//   const rl = rankloop("https://rank.example.com", "rk_...");   // a key with events:write only
//   rl.click(response.request_id, item.doc_id); rl.dwell(response.request_id, item.doc_id, 42);
// fetch with keepalive survives the page being left (as navigator.sendBeacon does) and, unlike
// sendBeacon, carries the Authorization header. Times are unix seconds, not Date.now()'s milliseconds.
function rankloop(base, key) {
  function send(requestId, docId, type, value) {
    const event = {event_id: crypto.randomUUID(), request_id: requestId, doc_id: docId, type: type,
                   value: value === undefined ? null : value, timestamp: Date.now() / 1000};
    const headers = {"Content-Type": "application/json"};
    if (key) headers["Authorization"] = "Bearer " + key;
    return fetch(base + "/events", {method: "POST", keepalive: true, headers: headers, body: JSON.stringify([event])})
      .then(function (r) { return r.json(); });
  }
  return {
    send: send,
    click: function (r, d) { return send(r, d, "click"); },
    skip: function (r, d) { return send(r, d, "skip"); },
    dwell: function (r, d, seconds) { return send(r, d, "dwell", seconds); },
    cite: function (r, d) { return send(r, d, "cite"); },
    citationDeleted: function (r, d) { return send(r, d, "citation_deleted"); },
    purchase: function (r, d, amount) { return send(r, d, "purchase", amount); },
    return_: function (r, d) { return send(r, d, "return"); },
  };
}
