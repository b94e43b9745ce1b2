# @summary A host deploybus deploys to: the deploybus-agent package (the
#   agent, fetcher and keepalive daemons), the host's private key, its config
#   and the running services.
#
# The config (`/etc/deploybus/deploybus.yaml`) is rendered from these
# parameters in the YAML the daemons read (docs/configuration.md); the
# projects come from deploybus::project, one file each in conf.d/, which
# the config includes. Every file is checked with `deploybus config check`
# (keys: `deploybus keys check`) before it is written, and the services are
# restarted only when something changed and the assembled config passed the
# check: a bad parameter fails the Puppet run, not the daemons.
#
# @example
#   class { 'deploybus::agent':
#     bus_url          => 'amqps://deploybus:secret@mq.example.com:5671/deploy',
#     host_key_content => Sensitive(file('/etc/puppetlabs/keys/web1.key')),
#     trusted_keys     => {
#       'orchestrator' => { 'key' => 'ed25519 3q2+7w... orchestrator', 'role' => 'orchestrator' },
#     },
#     environments     => { 'production' => { 'hosts' => ['web1', 'web2'] } },
#   }
#   deploybus::project { 'app': git => 'git@git.example.com:team/app.git', user => 'deploy' }
#
# @param bus_url
#   The broker (`bus.url`): amqp://, amqps://, stomp://, stomp+ssl://.
# @param trusted_keys
#   `keys.trusted`: name => { key => 'ed25519 <base64> name' (a .pub file's
#   line) or a path on the host, role => ..., host => ... }. A host needs the
#   orchestrator's public key (role orchestrator), and a `repo` key if it
#   watches packages.
# @param environments
#   `environments`: name => { hosts => [...], projects => [...], strategy =>
#   {...}, ... } exactly as in docs/configuration.md. This host must be in
#   one of them (its daemons refuse to start otherwise: checked here).
# @param host
#   This host's name: what its daemons are started with (`DEPLOYBUS_HOST` in
#   agent.env, the units' `--host`) and the name of its key file.
# @param host_key_content
#   This host's private key (PEM, as `deploybus keys generate NAME --role
#   host` writes it; Sensitive preferred), installed as
#   `<keys_dir>/<host>.key`, root:deploybus 0640.
# @param host_key_source
#   Or a file source for it. With neither, the key the package generated at
#   install is used (it is named after `hostname`; the run fails if there is
#   no `<keys_dir>/<host>.key`): trust its `.pub` on the orchestrator.
# @param policy
#   `keys.policy` rules (they matter where rollouts are asked for; on a host
#   usually empty).
# @param hosts
#   `hosts`: per-host overrides (root, state_dir, heartbeat, packages).
# @param root
#   `defaults.root`: the deploy root, `<root>/<project>/current`.
# @param manage_root
#   Make sure the deploy root directory exists (root-owned, 0755).
# @param state_dir
#   `defaults.state_dir` (undef: the daemons' default, /var/lib/deploybus).
# @param heartbeat
#   `defaults.heartbeat` in seconds (undef: 10).
# @param packages
#   `defaults.packages`: { watch => [...], command => ..., coalesce => ... }.
# @param extra_config
#   Any other top-level keys of docs/configuration.md (state, web, smtp, ...),
#   written as given between `keys` and `defaults`.
# @param cli_signing_key
#   `keys.signing`: the private key the CLI signs with on this host (the
#   daemons sign with the host key; undef: none).
# @param manage_config
#   Write the config file. On a host that also has deploybus::server, let
#   the server write it (false here); its environments must list this host.
# @param manage_env_file
#   Write `<config_dir>/agent.env` (DEPLOYBUS_HOST, DEPLOYBUS_HOST_KEY and
#   `env`), the units' EnvironmentFile.
# @param env
#   More variables for agent.env.
# @param manage_package
#   Install the package here (false: it is installed by other means).
# @param package_name
#   The package (packaging/README.md).
# @param package_ensure
#   installed, latest, a version, absent or purged.
# @param package_source
#   A .deb file to install from (then installed with dpkg unless
#   package_provider says otherwise); undef: from the configured apt sources.
# @param package_provider
#   The package provider (undef: dpkg with a package_source, else apt). `apt`
#   with a package_source installs the .deb and its dependencies.
# @param services
#   The units to manage (all three by default).
# @param service_ensure
#   running or stopped.
# @param service_enable
#   Start them at boot; 'unmanaged' for a provider that cannot (base).
# @param service_provider
#   undef: Puppet's default, systemd on a systemd host. Elsewhere (a
#   container without systemd as PID 1): `base`, with service_commands.
# @param service_commands
#   { <unit> => { start, stop, status, restart } } for such a provider.
class deploybus::agent (
  String[1] $bus_url,
  Hash[String[1], Deploybus::Trusted] $trusted_keys,
  Hash[String[1], Hash] $environments,
  String[1] $host = $facts['networking']['hostname'],
  Optional[Variant[String[1], Sensitive[String[1]]]] $host_key_content = undef,
  Optional[String[1]] $host_key_source = undef,
  Array[Deploybus::Policyrule] $policy = [],
  Hash[String[1], Hash] $hosts = {},
  Deploybus::Path $root = '/srv/deploy',
  Boolean $manage_root = true,
  Optional[Deploybus::Path] $state_dir = undef,
  Optional[Numeric] $heartbeat = undef,
  Optional[Hash] $packages = undef,
  Hash[String[1], Any] $extra_config = {},
  Optional[Deploybus::Path] $cli_signing_key = undef,
  Boolean $manage_config = true,
  Boolean $manage_env_file = true,
  Hash[Pattern[/\A[A-Z_][A-Z0-9_]*\z/], Variant[String, Numeric]] $env = {},
  Boolean $manage_package = true,
  String[1] $package_name = 'deploybus-agent',
  String[1] $package_ensure = 'installed',
  Optional[String[1]] $package_source = undef,
  Optional[String[1]] $package_provider = undef,
  Array[String[1]] $services = ['deploybus-agent', 'deploybus-fetcher', 'deploybus-keepalive'],
  Enum['running', 'stopped'] $service_ensure = 'running',
  Variant[Boolean, Enum['unmanaged']] $service_enable = true,
  Optional[String[1]] $service_provider = undef,
  Deploybus::Servicecommands $service_commands = {},
) {
  include deploybus

  if $host !~ /\A[A-Za-z0-9._-]+\z/ {
    fail("deploybus::agent: host '${host}' is not a valid host name (letters, digits, '.', '_', '-')")
  }
  $key_file = "${deploybus::keys_dir}/${host}.key"

  if $manage_package {
    deploybus::package { $package_name:
      ensure   => $package_ensure,
      source   => $package_source,
      provider => $package_provider,
    }
  }

  if $host_key_content != undef or $host_key_source != undef {
    deploybus::keyfile { $key_file:
      content => $host_key_content,
      source  => $host_key_source,
    }
  } else {
    # The package generated a key at install, named after `hostname`; if
    # `host` is another name there is none to sign with: fail the run
    # here, not the daemons.
    exec { "deploybus::agent: no private key ${key_file}: give host_key_content or host_key_source":
      command => '/bin/false',
      unless  => "/usr/bin/test -f ${key_file}",
      require => Class['deploybus'],
      before  => Deploybus::Service[$services],
    }
  }

  if $manage_env_file {
    file { "${deploybus::config_dir}/agent.env":
      ensure  => file,
      owner   => 'root',
      group   => 'root',
      mode    => '0644',
      content => epp('deploybus/env.epp', {
          'units'     => $services.join(', '),
          'variables' => { 'DEPLOYBUS_HOST' => $host, 'DEPLOYBUS_HOST_KEY' => $key_file } + $env,
      }),
      notify  => Exec['deploybus-config-check'],
    }
  }

  if $manage_root {
    file { $root:
      ensure => directory,
      owner  => 'root',
      group  => 'root',
      mode   => '0755',
    }
  }

  if $manage_config {
    if defined(Class['deploybus::config']) {
      fail(@(MSG/L))
        deploybus::agent: deploybus::server writes the config on this host already; \
        give deploybus::agent manage_config => false and list this host in the server's environments
        |- MSG
    }
    $listed = $environments.filter |$name, $e| { $e['hosts'] =~ Array and $host in $e['hosts'] }
    if $listed.empty {
      fail(@("MSG"/L))
        deploybus::agent: host '${host}' is in no environment's hosts \
        (environments: ${environments.keys.join(', ')}); its daemons would refuse to start
        |- MSG
    }
    $ours = ['bus', 'keys', 'defaults', 'hosts', 'environments', 'include']
    $clash = $extra_config.keys.filter |$k| { $k in $ours }
    unless $clash.empty {
      fail("deploybus::agent: extra_config may not set ${clash.join(', ')}: use the class's parameters")
    }
    $keys = {
      'signing' => $cli_signing_key,
      'trusted' => $trusted_keys,
      'policy'  => $policy,
    }.filter |$k, $v| { $v != undef and $v != [] }
    $defaults = {
      'root'      => $root,
      'state_dir' => $state_dir,
      'heartbeat' => $heartbeat,
      'packages'  => $packages,
    }.filter |$k, $v| { $v != undef }
    class { 'deploybus::config':
      declared_by => 'deploybus::agent',
      config      => { 'bus' => { 'url' => $bus_url }, 'keys' => $keys } + $extra_config + {
        'defaults'     => $defaults,
        'hosts'        => $hosts,
        'environments' => $environments,
      }.filter |$k, $v| { $v != {} },
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
}
