# @summary The orchestrator's machine: the deploybus-server package (the
#   orchestrator, web, listener, CI bridge and notifier daemons), their
#   private keys, the config and the services to run.
#
# Like deploybus::agent, the config is rendered from the parameters,
# projects come from deploybus::project (conf.d/), everything is checked
# before it is written and the services are restarted only after a change
# whose assembled config passed `deploybus config check`.
#
# A machine that is also a deploy target: declare both classes, give
# deploybus::agent `manage_config => false`, and list the host in this
# class's environments and its key in `trusted_keys` (both packages may be
# installed together; each daemon signs with its own key).
#
# @example
#   class { 'deploybus::server':
#     bus_url      => 'amqps://deploybus:secret@mq.example.com:5671/deploy',
#     state_url    => 'postgresql://deploybus@db.example.com/deploybus',
#     trusted_keys => {
#       'orchestrator' => { 'key' => 'ed25519 3q2+... orchestrator', 'role' => 'orchestrator' },
#       'alice'        => { 'key' => 'ed25519 9Zx... alice', 'role' => 'person' },
#       'web1'         => { 'key' => 'ed25519 Q1w... web1', 'role' => 'host' },
#     },
#     policy       => [{ 'signer' => 'alice', 'projects' => ['*'], 'environments' => ['*'] }],
#     environments => { 'production' => { 'hosts' => ['web1'], 'strategy' => { 'canary' => 1 } } },
#   }
#
# @param bus_url
#   The broker (`bus.url`).
# @param trusted_keys
#   `keys.trusted`: every key the server must believe (each host's, the
#   people's, its own daemons' (orchestrator, web, git, ci) as the
#   CLI and the web check answers with them).
# @param policy
#   `keys.policy`: who may ask for rollouts of what.
# @param environments
#   `environments`, as in docs/configuration.md.
# @param hosts
#   `hosts`: per-host overrides.
# @param state_url
#   `state.url` (undef: SQLite in the units' working directory,
#   /var/lib/deploybus/server/deploybus.db).
# @param state_dir
#   `state.dir` (undef: /var/lib/deploybus/server).
# @param web_allowed_hosts
#   `web.allowed_hosts`: the names people open the web with (empty: the
#   default, 127.0.0.1 and localhost).
# @param extra_config
#   Any other top-level keys (listener, smtp, ci, outbox, defaults, ...),
#   written as given after `state`.
# @param private_keys
#   { orchestrator|web|git|ci|notifier => { content => ... } or { source
#   => ... } }: installed as `<keys_dir>/<name>.key`. A daemon without one
#   here uses the key the package generated at install.
# @param cli_signing_key
#   `keys.signing`: the private key the CLI signs with on this machine.
# @param manage_config
#   Write the config file.
# @param manage_env_file
#   Write `<config_dir>/server.env` (web_bind, web_port, ci_bridge_args,
#   env).
# @param web_bind
#   DEPLOYBUS_WEB_BIND: where the web listens.
# @param web_port
#   DEPLOYBUS_WEB_PORT.
# @param ci_bridge_args
#   DEPLOYBUS_CI_BRIDGE_ARGS (e.g. '--listen 127.0.0.1:8091').
# @param env
#   More variables for server.env.
# @param manage_package
#   Install the package here (false: it is installed by other means).
# @param package_name
#   The package (packaging/README.md).
# @param package_ensure
#   installed, latest, a version, absent or purged.
# @param package_source
#   A .deb file to install from (dpkg unless package_provider says otherwise).
# @param package_provider
#   undef: dpkg with a package_source, else apt.
# @param services
#   The units to run.
# @param stopped_services
#   The package's other units: kept stopped and disabled.
# @param service_ensure
#   running or stopped (for `services`).
# @param service_enable
#   Start them at boot; 'unmanaged' for a provider that cannot.
# @param service_provider
#   undef: Puppet's default (systemd on a systemd host), else e.g. base.
# @param service_commands
#   { <unit> => { start, stop, status, restart } } for such a provider.
class deploybus::server (
  String[1] $bus_url,
  Hash[String[1], Deploybus::Trusted] $trusted_keys,
  Array[Deploybus::Policyrule] $policy = [],
  Hash[String[1], Hash] $environments = {},
  Hash[String[1], Hash] $hosts = {},
  Optional[String[1]] $state_url = undef,
  Optional[Deploybus::Path] $state_dir = undef,
  Array[String[1]] $web_allowed_hosts = [],
  Hash[String[1], Any] $extra_config = {},
  Hash[Enum['orchestrator', 'web', 'git', 'ci', 'notifier'], Deploybus::Privatekey] $private_keys = {},
  Optional[Deploybus::Path] $cli_signing_key = undef,
  Boolean $manage_config = true,
  Boolean $manage_env_file = true,
  String[1] $web_bind = '127.0.0.1',
  Integer[1, 65535] $web_port = 8080,
  String $ci_bridge_args = '',
  Hash[Pattern[/\A[A-Z_][A-Z0-9_]*\z/], Variant[String, Numeric]] $env = {},
  Boolean $manage_package = true,
  String[1] $package_name = 'deploybus-server',
  String[1] $package_ensure = 'installed',
  Optional[String[1]] $package_source = undef,
  Optional[String[1]] $package_provider = undef,
  Array[String[1]] $services = ['deploybus-orchestrator', 'deploybus-web'],
  Array[String[1]] $stopped_services = ['deploybus-listener', 'deploybus-ci-bridge', 'deploybus-notifier'],
  Enum['running', 'stopped'] $service_ensure = 'running',
  Variant[Boolean, Enum['unmanaged']] $service_enable = true,
  Optional[String[1]] $service_provider = undef,
  Deploybus::Servicecommands $service_commands = {},
) {
  include deploybus

  if $manage_package {
    deploybus::package { $package_name:
      ensure   => $package_ensure,
      source   => $package_source,
      provider => $package_provider,
    }
  }

  $private_keys.each |$name, $key| {
    deploybus::keyfile { "${deploybus::keys_dir}/${name}.key":
      * => $key,
    }
  }

  if $manage_env_file {
    file { "${deploybus::config_dir}/server.env":
      ensure  => file,
      owner   => 'root',
      group   => 'root',
      mode    => '0644',
      content => epp('deploybus/env.epp', {
          'units'     => ($services + $stopped_services).join(', '),
          'variables' => {
            'DEPLOYBUS_WEB_BIND'       => $web_bind,
            'DEPLOYBUS_WEB_PORT'       => $web_port,
            'DEPLOYBUS_CI_BRIDGE_ARGS' => $ci_bridge_args,
          } + $env,
      }),
      notify  => Exec['deploybus-config-check'],
    }
  }

  if $manage_config {
    if defined(Class['deploybus::config']) {
      fail(@(MSG/L))
        deploybus::server: deploybus::agent writes the config on this host already; \
        give deploybus::agent manage_config => false
        |- MSG
    }
    $ours = ['bus', 'keys', 'state', 'web', 'hosts', 'environments', 'include']
    $clash = $extra_config.keys.filter |$k| { $k in $ours }
    unless $clash.empty {
      fail("deploybus::server: extra_config may not set ${clash.join(', ')}: use the class's parameters")
    }
    $keys = {
      'signing' => $cli_signing_key,
      'trusted' => $trusted_keys,
      'policy'  => $policy,
    }.filter |$k, $v| { $v != undef and $v != [] }
    $state = { 'url' => $state_url, 'dir' => $state_dir }.filter |$k, $v| { $v != undef }
    $web = $web_allowed_hosts.empty ? {
      true    => {},
      default => { 'allowed_hosts' => $web_allowed_hosts },
    }
    class { 'deploybus::config':
      declared_by => 'deploybus::server',
      config      => ({ 'bus' => { 'url' => $bus_url }, 'keys' => $keys, 'state' => $state }
        + $extra_config + {
          'web'          => $web,
          'hosts'        => $hosts,
          'environments' => $environments,
      }).filter |$k, $v| { $v != {} },
    }
  }

  $unit_package = $manage_package ? {
    true    => $package_name,
    default => undef,
  }
  $services.each |$unit| {
    deploybus::service { $unit:
      ensure   => $service_ensure,
      enable   => $service_enable,
      provider => $service_provider,
      commands => $service_commands,
      package  => $unit_package,
    }
  }
  $stopped_enable = $service_enable ? {
    'unmanaged' => 'unmanaged',
    default     => false,
  }
  ($stopped_services - $services).each |$unit| {
    deploybus::service { $unit:
      ensure   => 'stopped',
      enable   => $stopped_enable,
      provider => $service_provider,
      commands => $service_commands,
      package  => $unit_package,
    }
  }
}
