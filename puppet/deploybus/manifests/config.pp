# @summary The config file, rendered from the role class's parameters (private:
#   declared by deploybus::agent or deploybus::server, whichever has
#   manage_config).
#
# @api private
#
# @param config
#   The config's top-level keys (bus, keys, state, defaults, hosts,
#   environments, ...) in the order they are written. `include:` is added:
#   `<conf_d>/*.yaml`, where deploybus::project writes.
# @param declared_by
#   The class that declared this one (for the error when both try).
class deploybus::config (
  Hash[String[1], Any] $config,
  String[1] $declared_by,
) {
  include deploybus

  file { $deploybus::config_file:
    ensure       => file,
    owner        => 'root',
    group        => $deploybus::group,
    mode         => '0640',
    content      => epp('deploybus/deploybus.yaml.epp', {
        'config'      => $config,
        'include'     => "${deploybus::conf_d}/*.yaml",
        'declared_by' => $declared_by,
    }),
    # checked (with the conf.d files already there) before it replaces the
    # old file: a bad parameter fails here and the old config stays
    validate_cmd => "${deploybus::deploybus_bin} config check % --as ${deploybus::config_file}",
    notify       => Exec['deploybus-config-check'],
  }

  # Projects first: the config's environments may name them, and its check
  # reads them.
  Deploybus::Project <| |> -> File[$deploybus::config_file]
}
