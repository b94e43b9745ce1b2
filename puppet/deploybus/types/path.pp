# @summary An absolute path without whitespace or '%' (it goes into
#   validate_cmd and exec command lines unquoted).
type Deploybus::Path = Pattern[/\A\/[^\s%]*\z/]
