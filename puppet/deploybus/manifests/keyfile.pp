# @summary A private key file the daemons sign with (private: declared by
#   deploybus::agent and deploybus::server). Checked with `deploybus keys
#   check` before it replaces the old one; never shown in a diff.
#
# @api private
#
# @param content
#   The PEM text (as `deploybus keys generate` writes it).
# @param source
#   Or a file source Puppet fetches it from.
define deploybus::keyfile (
  Optional[Variant[String[1], Sensitive[String[1]]]] $content = undef,
  Optional[String[1]] $source = undef,
) {
  include deploybus

  if ($content == undef) == ($source == undef) {
    fail("deploybus: key ${title}: give exactly one of its content or its source")
  }
  file { $title:
    ensure       => file,
    owner        => 'root',
    group        => $deploybus::group,
    mode         => '0640',
    content      => $content,
    source       => $source,
    show_diff    => false,
    validate_cmd => "${deploybus::deploybus_bin} keys check %",
    notify       => Exec['deploybus-config-check'],
  }
}
