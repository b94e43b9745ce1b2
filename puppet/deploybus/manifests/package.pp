# @summary One deploybus package (private: declared by deploybus::agent and
#   deploybus::server), installed before the files that belong to the
#   deploybus group it creates.
#
# @api private
#
# @param ensure
#   installed, latest, a version, absent or purged.
# @param source
#   A .deb file to install from; undef: from the configured apt sources.
# @param provider
#   undef: dpkg with a source (apt would also fetch its dependencies), else
#   Puppet's default (apt).
define deploybus::package (
  String[1] $ensure,
  Optional[String[1]] $source,
  Optional[String[1]] $provider,
) {
  include deploybus

  $chosen = $provider ? {
    undef   => $source ? {
      undef   => undef,
      default => 'dpkg',
    },
    default => $provider,
  }
  package { $title:
    ensure   => $ensure,
    source   => $source,
    provider => $chosen,
  }
  # the package makes the deploybus group the files of Class['deploybus'] belong to
  Package[$title] -> Class['deploybus']
}
