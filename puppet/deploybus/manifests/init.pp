# @summary What deploybus::agent and deploybus::server share on a host: the
#   configuration directory, conf.d/ (one file per deploybus::project), the
#   keys directory, and the check of the assembled config that stands
#   between any change and a restart of the daemons.
#
# Both role classes `include deploybus`; set these parameters through Hiera
# (deploybus::config_dir, ...) only if the packages' paths differ.
#
# How a change reaches the daemons: every file the daemons read (the config,
# each conf.d file, the private keys, the units' environment files) is
# checked with `validate_cmd` before it replaces the old one, so a bad
# parameter fails the Puppet run and leaves the file as it was; then the
# exec Exec['deploybus-config-check'] checks the whole assembled config once
# more (a conf.d file purged while the config still names its project is
# caught here), and only if that passes are the services restarted.
#
# @param config_dir
#   The configuration directory (the packages make it, root:root 0755).
# @param config_file
#   The one config file every daemon reads (the units' `--config`).
# @param conf_d
#   Where deploybus::project writes one file per project; the config file
#   includes `<conf_d>/*.yaml`.
# @param keys_dir
#   Private and public keys (root:deploybus 0750, as the packages make it).
# @param deploybus_bin
#   The deploybus command used to check files before they are written
#   (`/usr/bin/deploybus` is an alternative either package provides).
# @param group
#   The daemons' group, which may read the config and the keys.
# @param purge_conf_d
#   Remove files in conf_d that no deploybus::project declares.
class deploybus (
  Deploybus::Path $config_dir = '/etc/deploybus',
  Deploybus::Path $config_file = "${config_dir}/deploybus.yaml",
  Deploybus::Path $conf_d = "${config_dir}/conf.d",
  Deploybus::Path $keys_dir = "${config_dir}/keys",
  Deploybus::Path $deploybus_bin = '/usr/bin/deploybus',
  String[1] $group = 'deploybus',
  Boolean $purge_conf_d = true,
) {
  file { $config_dir:
    ensure => directory,
    owner  => 'root',
    group  => 'root',
    mode   => '0755',
  }

  file { $keys_dir:
    ensure => directory,
    owner  => 'root',
    group  => $group,
    mode   => '0750',
  }

  file { $conf_d:
    ensure       => directory,
    owner        => 'root',
    group        => $group,
    mode         => '0750',
    recurse      => $purge_conf_d,
    recurselimit => 1,
    purge        => $purge_conf_d,
    force        => false,
    notify       => Exec['deploybus-config-check'],
  }

  # The last word before a restart: the assembled config (the file and
  # everything it includes) as the daemons will read it.
  exec { 'deploybus-config-check':
    command     => "${deploybus_bin} config check ${config_file}",
    refreshonly => true,
    logoutput   => true,
  }
}
