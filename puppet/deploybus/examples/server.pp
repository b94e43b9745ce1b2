# The orchestrator's machine: the orchestrator and the web front end, a
# PostgreSQL store, who may deploy what, and the project it deploys.
# `puppet apply --noop --modulepath puppet/ examples/server.pp` shows what
# it would do.
class { 'deploybus::server':
  bus_url           => 'amqps://deploybus:secret@mq.example.com:5671/deploy',
  package_source    => '/var/cache/deploybus/deploybus-server_0.1.0-1_amd64.deb',
  state_url         => 'postgresql://deploybus@db.example.com/deploybus',
  web_allowed_hosts => ['deploy.example.com'],
  # The daemons' private keys; the package generates any not given here, e.g.
  #   private_keys => { 'orchestrator' => { 'source' => 'puppet:///modules/site/deploybus/orchestrator.key' } },
  trusted_keys      => {
    'orchestrator' => {
      'key'  => 'ed25519 hT3YRmxXZzStQWmr/dxNhNIlVtiR0tmXQoPcSWc1kxo= orchestrator',
      'role' => 'orchestrator',
    },
    'alice'        => { 'key' => 'ed25519 bnIz2A0R8ma45wSxLjYNmeZ03MBtzGwE2WJ6vhMbn6w= alice', 'role' => 'person' },
    'web'          => { 'key' => '/etc/deploybus/keys/web.pub', 'role' => 'web' },
    'web1'         => { 'key' => 'ed25519 4bXoEHdYbnUJrD8yZ0yTsk0uW/9Y3j0Up7j0+a9Ws1E= web1', 'role' => 'host' },
    'web2'         => { 'key' => 'ed25519 7qyG3uAQkEz2kQ8cfzCgsNwRPhRmvAUvq7S6Rn2H9fM= web2', 'role' => 'host' },
  },
  policy            => [
    { 'signer' => 'alice', 'projects' => ['*'], 'environments' => ['*'] },
    { 'role' => 'web', 'projects' => ['*'], 'environments' => ['staging'] },
  ],
  environments      => {
    'production' => {
      'hosts'    => ['web1', 'web2'],
      'strategy' => { 'canary' => 1, 'batch' => '50%', 'auto_rollback' => true },
      'windows'  => { 'timezone' => 'Europe/Berlin', 'allow' => ['Mon-Thu 09:00-17:00'] },
    },
  },
  services          => ['deploybus-orchestrator', 'deploybus-web', 'deploybus-notifier'],
}

deploybus::project { 'app':
  git     => 'git@git.example.com:team/app.git',
  scripts => { 'post' => 'make smoke' },
  keep    => 5,
}
