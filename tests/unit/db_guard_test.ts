/**
 * postgres.js 3.4.9's timer races after a closed connection (shared/db/mod.ts): exactly those
 * TypeErrors are recognised, anything else still ends the worker.
 */
import assert from "node:assert/strict";
import { isTimerRaceAfterClose } from "../../shared/db/mod.ts";

const at = (fn: string) =>
  `    at ${fn} (file:///x/node_modules/.deno/postgres@3.4.9/node_modules/postgres/src/connection.js:263:12)`;

function typeError(message: string, frame: string): TypeError {
  const e = new TypeError(message);
  e.stack =
    `TypeError: ${message}\n${frame}\n    at Timeout.done [as _onTimeout] (file:///x/connection.js:1059:8)`;
  return e;
}

Deno.test("the connect timer firing after close (socket.destroy on null) is recognised", () => {
  assert.equal(
    isTimerRaceAfterClose(
      typeError("Cannot read properties of null (reading 'destroy')", at("connectTimedOut")),
    ),
    true,
  );
});

Deno.test("the deferred write after close is recognised", () => {
  assert.equal(
    isTimerRaceAfterClose(
      typeError("Cannot read properties of null (reading 'write')", at("nextWrite")),
    ),
    true,
  );
});

Deno.test("the same messages from anywhere else, and other errors, are not", () => {
  assert.equal(
    isTimerRaceAfterClose(
      typeError("Cannot read properties of null (reading 'destroy')", at("mine")),
    ),
    false,
  );
  assert.equal(isTimerRaceAfterClose(new Error("reading 'destroy' in connectTimedOut")), false);
  assert.equal(
    isTimerRaceAfterClose(typeError("x is not a function", at("connectTimedOut"))),
    false,
  );
});
