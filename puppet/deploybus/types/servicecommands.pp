# @summary Commands for a service provider that takes them (e.g. `base`),
#   per unit name: where systemd is not PID 1.
type Deploybus::Servicecommands = Hash[String[1], Struct[{
      Optional[start]   => String[1],
      Optional[stop]    => String[1],
      Optional[status]  => String[1],
      Optional[restart] => String[1],
}]]
