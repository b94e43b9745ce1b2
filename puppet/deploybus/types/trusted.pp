# @summary One keys.trusted entry: a public key (the `ed25519 <base64> name`
#   line of a .pub file, or the path of one on the host) and its one role.
type Deploybus::Trusted = Struct[{
    key            => String[1],
    role           => Enum['person', 'web', 'ci', 'orchestrator', 'host', 'git', 'repo'],
    Optional[host] => String[1],
}]
