# @summary Data as block-style YAML, the way deploybus's config files are
#   written by hand: one key per line, so an error the daemons report
#   (file, line and key) points at the line that holds the value.
#
# Mappings keep Puppet's (insertion) order. Keys that are plain names are
# written bare, others (and YAML's yes/no/on/off words) double-quoted.
# Sequences of scalars are written in flow style (`[a, b]`), others as
# block sequences. Strings are always double-quoted (deploybus::yaml_scalar).
#
# @param value The data (Hash, Array or scalar).
# @param indent The indentation of this value's lines (nested calls).
# @return [String] The YAML, without a trailing newline.
function deploybus::to_yaml(Any $value, String $indent = '') >> String {
  $nested = "${indent}  "
  case $value {
    Hash: {
      if $value.empty {
        '{}'
      } else {
        $value.map |$k, $v| {
          $key = ($k =~ String and $k =~ /\A[A-Za-z_][A-Za-z0-9_.\/-]*\z/
            and !($k.downcase in ['y', 'n', 'yes', 'no', 'on', 'off', 'true', 'false', 'null'])) ? {
            true    => $k,
            default => deploybus::yaml_scalar(String($k)),
          }
          $block = ($v =~ Hash and !$v.empty) or ($v =~ Array and !$v.empty
            and !$v.all |$e| { $e =~ Variant[Scalar, Undef, Sensitive] })
          $block ? {
            true    => "${indent}${key}:\n${deploybus::to_yaml($v, $nested)}",
            default => "${indent}${key}: ${deploybus::to_yaml($v, $nested)}",
          }
        }.join("\n")
      }
    }
    Array: {
      if $value.empty {
        '[]'
      } elsif $value.all |$e| { $e =~ Variant[Scalar, Undef, Sensitive] } {
        "[${value.map |$e| { deploybus::yaml_scalar($e) }.join(', ')}]"
      } else {
        $value.map |$e| {
          if $e =~ Hash and !$e.empty {
            # the mapping's first key goes on the dash's line
            $body = deploybus::to_yaml($e, $nested)
            "${indent}- ${body[$nested.length, -1]}"
          } elsif $e =~ Array and !$e.empty and !$e.all |$x| { $x =~ Variant[Scalar, Undef, Sensitive] } {
            "${indent}-\n${deploybus::to_yaml($e, $nested)}"
          } else {
            "${indent}- ${deploybus::to_yaml($e, $nested)}"
          }
        }.join("\n")
      }
    }
    default: { deploybus::yaml_scalar($value) }
  }
}
