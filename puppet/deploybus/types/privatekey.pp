# @summary A private key to install: its PEM text (`content`, preferably
#   Sensitive) or a file source Puppet can fetch (`source`, e.g.
#   puppet:///modules/site/keys/web1.key).
type Deploybus::Privatekey = Variant[
  Struct[{ content => Variant[String[1], Sensitive[String[1]]] }],
  Struct[{ source => String[1] }],
]
