#!/usr/bin/env bash
# Make sure a RabbitMQ answers on 127.0.0.1:5672 for the tests; start the machine's own if not.
set -euo pipefail
answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if answers; then
  echo "broker: RabbitMQ answers on 127.0.0.1:5672"
  exit 0
fi
echo "broker: starting rabbitmq-server"
sudo=$([ "$(id -u)" = 0 ] || echo sudo)
$sudo rabbitmq-server -detached
$sudo timeout 120 rabbitmqctl await_startup
answers || { echo "broker: RabbitMQ started but 127.0.0.1:5672 does not answer" >&2; exit 1; }
echo "broker: RabbitMQ is up"
