'use strict';
/**
 * The echo sidecar in Node.js: the same behaviour as examples/echo (Rust) and
 * examples/python/echo_sidecar.py.
 *
 * It claims `echo.ping` and `echo.pong`. A ping from a peer is answered with a
 * pong routed back to it, greeting the peer by the friendly name the daemon's
 * directory gives (LookupName, else "stranger"); a pong is logged.
 *
 * The daemon spawns it after `npm install --prefix examples/node`, with, in
 * its sidecars file:
 *
 *   command = ["/usr/bin/node", "/abs/path/examples/node/echo_sidecar.js"]
 *   sandbox = { read_paths = ["/abs/path/examples/node", "/abs/path/proto",
 *                             "/etc/ssl/openssl.cnf"] }
 *
 * (pim_sidecar.js loads ../../proto at run time; node reads OpenSSL's
 * configuration at start and exits 13 when it may not; add node's
 * installation prefix when it is not under /usr). Run it by hand with
 * PIM_PLUGIN_SOCKET and PIM_PLUGIN_TOKEN_FILE set.
 */

const pim = require('./pim_sidecar');

class Echo {
  constructor() {
    this.name = 'echo';
    this.payloadKinds = ['echo.ping', 'echo.pong'];
    this.host = null;
  }

  start(host, dataDir, granted) {
    this.host = host;
  }

  async handlePayload(src, kind, body) {
    const text = body.toString('utf8'); // invalid UTF-8 becomes U+FFFD
    if (kind === 'echo.ping') {
      const name = (await this.host.lookupName(src)) || 'stranger';
      pim.log('INFO', `ping from ${name}: ${text}`);
      const pong = pim.pluginPayload('echo.pong', `hello ${name}, you said: ${text}`);
      const routed = await this.host.sendRouted(src, pong);
      pim.log('INFO', `pong to ${name}: routed=${routed}`);
    } else {
      pim.log('INFO', `pong from ${src.toString('hex')}: ${text}`);
    }
  }

  onPeerForgotten(node) {
    pim.log('INFO', `peer forgotten: ${node.toString('hex')}`);
  }
}

module.exports = { Echo };

if (require.main === module) {
  pim.main(new Echo());
}
