// @weir/sdk/internal: the SDK's host slot, its one registered handler and
// the call protocol shared by the component entry and the test harness.
// Not for handler code.

let host = null;
let registered = null;

/** Puts `next` in the host slot and returns what was there. */
export function installHost(next) {
  const previous = host;
  host = next;
  return previous;
}

/** The host of the current call; outside a call, an error that says why. */
export function currentHost() {
  if (host === null) {
    throw new Error(
      '@weir/sdk: state, emit, log and trace work only during a handler call: ' +
        'in a deployed component, or inside Harness.call from @weir/sdk/testing',
    );
  }
  return host;
}

export function register(fn) {
  if (typeof fn !== 'function') {
    throw new TypeError('@weir/sdk: handler() takes the function to call per event');
  }
  if (registered !== null && registered !== fn) {
    throw new Error('@weir/sdk: a component has one handler, and one is already declared');
  }
  registered = fn;
  return fn;
}

export function registeredHandler() {
  if (registered === null) {
    throw new Error('@weir/sdk: no function is declared with handler(...)');
  }
  return registered;
}
