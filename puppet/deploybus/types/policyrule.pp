# @summary One keys.policy rule: who (a key's name, or a role) may ask for
#   rollouts of which projects to which environments (globs).
type Deploybus::Policyrule = Struct[{
    Optional[signer]       => String[1],
    Optional[role]         => Enum['person', 'web', 'ci'],
    Optional[projects]     => Array[String[1]],
    Optional[environments] => Array[String[1]],
}]
