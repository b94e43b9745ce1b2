# A host that deploybus deploys `app` to, from the built package (`make deb`
# puts it in packaging/dist/), with its own key and the orchestrator's
# public key. `puppet apply --noop --modulepath puppet/ examples/agent.pp`
# shows what it would do.
class { 'deploybus::agent':
  bus_url        => 'amqps://deploybus:secret@mq.example.com:5671/deploy',
  package_source => '/var/cache/deploybus/deploybus-agent_0.1.0-1_amd64.deb',
  # The host's private key; without it, the one the package generated at
  # install (/etc/deploybus/keys/<host>.key) is kept: trust its .pub on the
  # orchestrator. E.g.:
  #   host_key_content => Sensitive(file('/etc/puppetlabs/code/keys/web1.key')),
  #   host_key_source  => 'puppet:///modules/site/deploybus/web1.key',
  trusted_keys   => {
    'orchestrator' => {
      'key'  => 'ed25519 hT3YRmxXZzStQWmr/dxNhNIlVtiR0tmXQoPcSWc1kxo= orchestrator',
      'role' => 'orchestrator',
    },
  },
  environments   => {
    'production' => {
      'hosts'    => [$facts['networking']['hostname'], 'web2'],
      'strategy' => { 'canary' => 1, 'batch' => '50%', 'max_failures' => 0 },
    },
  },
  root           => '/srv/deploy',
}

deploybus::project { 'app':
  git     => 'git@git.example.com:team/app.git',
  scripts => {
    'pre'         => './ci/pre-deploy.sh',
    'post'        => 'make smoke',
    # no sudo under the agent's unit (NoNewPrivileges): a .path unit can
    # reload the app when this file changes
    'post_switch' => 'touch /srv/deploy/app/shared/reload',
  },
  keep    => 5,
  shared  => ['log', '.env'],
  health  => { 'url' => 'http://127.0.0.1:8001/healthz', 'retries' => 3 },
  user    => 'deploy',
}
