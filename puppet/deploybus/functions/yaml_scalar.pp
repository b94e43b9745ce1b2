# @summary One scalar as YAML: a string double-quoted (JSON escapes), a
#   number, true/false, or null.
#
# Double-quoted strings need no thought about what YAML would make of them
# (`on`, `no`, `1.0`, `*`, `: `, a leading `!`), so the daemons read exactly
# the string Puppet was given.
#
# @param value A String, Numeric, Boolean, Undef or Sensitive value.
# @return [String] The YAML scalar.
function deploybus::yaml_scalar(Any $value) >> String {
  case $value {
    Undef: { 'null' }
    Boolean: { String($value) }
    Numeric: { String($value, '%p') }
    Sensitive: { deploybus::yaml_scalar($value.unwrap) }
    String: {
      $escaped = $value.regsubst(/\\/, '\\\\\\\\', 'G').regsubst(/"/, '\\\\"', 'G')
      .regsubst(/\n/, '\\\\n', 'G').regsubst(/\t/, '\\\\t', 'G').regsubst(/\r/, '\\\\r', 'G')
      "\"${escaped}\""
    }
    default: { fail("deploybus: cannot write a ${type($value, 'generalized')} into the YAML config") }
  }
}
