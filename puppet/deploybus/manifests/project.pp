# @summary A project deploybus deploys (`projects.<name>` of
#   docs/configuration.md), written to `<conf_d>/<name>.yaml`, which the
#   config file includes.
#
# Declare it on every host that deploys the project (with deploybus::agent)
# and on the orchestrator's (with deploybus::server), which resolves refs
# on its git server. The file is checked with `deploybus config check
# <config> --include-candidate <file> %` before it is written, so a bad
# parameter fails the Puppet run; the daemons are restarted only when it
# changed and the assembled config passed the check.
#
# @example
#   deploybus::project { 'app':
#     git     => 'git@git.example.com:team/app.git',
#     scripts => { 'pre' => './ci/pre-deploy.sh', 'post' => 'make smoke' },
#     keep    => 5,
#     user    => 'deploy',
#   }
#
# @param git
#   The repository URL or path the mirrors fetch from.
# @param svn
#   Or a Subversion URL (docs/subversion.md; not deployable yet).
# @param scripts
#   { pre, post, post_switch } shell snippets (`/bin/sh -c`).
# @param keep
#   Releases kept per host (undef: 5).
# @param script_timeout
#   Seconds per script (undef: 600).
# @param shared
#   Paths linked from `<root>/<project>/shared/` into each release.
# @param health
#   { command | url, retries, interval, timeout }: checked before the switch.
# @param user
#   The account the scripts and the health command run as (undef: the
#   agent's, root). It must exist on the host (Puppet does not make it).
# @param group
#   Its group (undef: the user's primary group).
# @param root
#   The deploy root this project lands in on this host: `<root>/<name>`.
#   The root is per host (deploybus::agent's `root`, `defaults.root`), so
#   this may only repeat it; undef: that root.
# @param manage_dir
#   On a host with deploybus::agent and a `user`, make `<root>/<name>` a
#   directory owned by that user (the pre script runs there as the user).
# @param extra_config
#   Any other key of a project (output, ci, webhook, notify, ...), written
#   as given.
# @param ensure
#   present, or absent to remove the file (conf.d is purged of files no
#   deploybus::project declares anyway).
define deploybus::project (
  Optional[String[1]] $git = undef,
  Optional[String[1]] $svn = undef,
  Hash[Enum['pre', 'post', 'post_switch'], String[1]] $scripts = {},
  Optional[Integer[1]] $keep = undef,
  Optional[Numeric] $script_timeout = undef,
  Array[String[1]] $shared = [],
  Optional[Hash] $health = undef,
  Optional[String[1]] $user = undef,
  Optional[String[1]] $group = undef,
  Optional[Deploybus::Path] $root = undef,
  Boolean $manage_dir = true,
  Hash[String[1], Any] $extra_config = {},
  Enum['present', 'absent'] $ensure = 'present',
) {
  include deploybus

  if $title !~ /\A[A-Za-z0-9][A-Za-z0-9._-]*\z/ {
    fail("deploybus::project[${title}]: not a valid project name (letters, digits, '.', '_', '-')")
  }
  if $ensure == 'present' and ($git == undef) == ($svn == undef) {
    fail("deploybus::project[${title}]: give one of git (the repository URL or path) or svn")
  }
  $on_agent = defined(Class['deploybus::agent'])
  if $root != undef and $on_agent and $root != $deploybus::agent::root {
    fail(@("MSG"/L))
      deploybus::project[${title}]: root ${root} is not this host's deploy root \
      ${deploybus::agent::root}: the root is per host (deploybus::agent's root)
      |- MSG
  }

  $project = {
    'git'            => $git,
    'svn'            => $svn,
    'keep'           => $keep,
    'script_timeout' => $script_timeout,
    'scripts'        => $scripts,
    'shared'         => $shared,
    'health'         => $health,
    'user'           => $user,
    'group'          => $group,
  }.filter |$k, $v| { $v != undef and $v != {} and $v != [] } + $extra_config

  $file = "${deploybus::conf_d}/${title}.yaml"
  $file_ensure = $ensure ? {
    'present' => file,
    default   => absent,
  }
  file { $file:
    ensure       => $file_ensure,
    owner        => 'root',
    group        => $deploybus::group,
    mode         => '0640',
    content      => epp('deploybus/project.yaml.epp', { 'name' => $title, 'project' => $project }),
    validate_cmd => "${deploybus::deploybus_bin} config check ${deploybus::config_file} --include-candidate ${file} %",
    notify       => Exec['deploybus-config-check'],
  }

  if $ensure == 'present' and $manage_dir and $user != undef and $on_agent {
    file { "${deploybus::agent::root}/${title}":
      ensure => directory,
      owner  => $user,
      group  => $group,
    }
  }
}
