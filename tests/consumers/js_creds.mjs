// Real AWS SDK for JavaScript v3 as an unmodified consumer of iotcred: the default Node.js
// provider chain, configured only through environment variables. Prints the credentials as
// one JSON line, then again for every line read on stdin (the SDK refreshes near expiry).
import { fromNodeProviderChain } from "@aws-sdk/credential-providers";
import readline from "node:readline";

const provider = fromNodeProviderChain();
async function show() {
  const c = await provider();
  console.log(JSON.stringify({
    AccessKeyId: c.accessKeyId, SecretAccessKey: c.secretAccessKey, Token: c.sessionToken,
    Expiration: c.expiration ? c.expiration.toISOString() : null,
  }));
}
try {
  await show();
  const rl = readline.createInterface({ input: process.stdin });
  for await (const _line of rl) { await show(); }
} catch (e) {
  console.log(JSON.stringify({ error: String(e && e.message || e) }));
  process.exit(1);
}
