/** Hex sha256 with WebCrypto (Node >= 20 and browsers: globalThis.crypto.subtle). */
export async function sha256Hex(bytes: Uint8Array): Promise<string> {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) {
    throw new Error('globalThis.crypto.subtle is not available (an insecure http:// page, or an old ' +
      'React Native without a WebCrypto polyfill); it is needed to check the artifact\'s sha256 sums.');
  }
  const digest = await subtle.digest('SHA-256', bytes as unknown as ArrayBuffer);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}
