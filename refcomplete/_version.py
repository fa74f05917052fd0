"""Version constants: the package version and the version of the behaviour contract.

Knows: two strings. Does not know: anything else. Kept import-free so that
`import refcomplete` stays fast.

CONTRACT_VERSION names the revision of docs/semantics.md (coins, sampling order,
logprobs rules). Bump it whenever a change can alter a response for the same
request and seed; it enters `system_fingerprint`.
"""

__version__ = "0.1.0"
CONTRACT_VERSION = "2"   # 2: our own exp, log and sums (SEMANTICS 11); bits no longer depend on the CPU
