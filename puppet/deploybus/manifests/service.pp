# @summary One daemon's service (private: declared by deploybus::agent and
#   deploybus::server). Started once its package and the config are in place;
#   restarted only when Exec['deploybus-config-check'] passed after a change.
#
# @api private
#
# @param ensure
#   running or stopped.
# @param enable
#   Start at boot; 'unmanaged' leaves it alone (a provider that cannot
#   enable, such as `base`).
# @param provider
#   The service provider; undef: Puppet's default (systemd where systemd is
#   PID 1).
# @param commands
#   start/stop/status/restart commands per unit, for providers that take them.
# @param package
#   The package that installs the unit, if Puppet installs it.
define deploybus::service (
  Enum['running', 'stopped'] $ensure,
  Variant[Boolean, Enum['unmanaged']] $enable,
  Optional[String[1]] $provider,
  Deploybus::Servicecommands $commands,
  Optional[String[1]] $package,
) {
  include deploybus

  $own = $commands[$title] ? {
    undef   => {},
    default => $commands[$title],
  }
  $enabled = $enable ? {
    'unmanaged' => undef,
    default     => $enable,
  }
  service { $title:
    ensure    => $ensure,
    enable    => $enabled,
    provider  => $provider,
    start     => $own['start'],
    stop      => $own['stop'],
    status    => $own['status'],
    restart   => $own['restart'],
    require   => File[$deploybus::config_file],
    subscribe => Exec['deploybus-config-check'],
  }
  if $package != undef {
    Package[$package] -> Service[$title]
  }
}
