#!/usr/bin/python3
# A RabbitMQ client for the AMQP tests and the bench (python3-pika, Debian).
#
#   amqp_consumer.py --port P [--max-length N] declare EXCHANGE QUEUE BINDING [BINDING...]
#       a durable topic exchange, a durable queue bound to it by each binding
#       (--max-length: full at N messages, then it rejects publishes: nacks)
#   amqp_consumer.py --port P delete-exchange EXCHANGE
#   amqp_consumer.py --port P count QUEUE          prints the queue's length
#   amqp_consumer.py --port P consume QUEUE --log FILE [--max-seconds N]
#       appends one JSON line per message to FILE, then acks it; reconnects
#       (every 0.2 s) when the broker goes away; stops on SIGTERM or after
#       --max-seconds.
# Loopback only: it connects to 127.0.0.1 and nowhere else.
import argparse
import json
import signal
import sys
import time

import pika

parser = argparse.ArgumentParser()
parser.add_argument('--port', type=int, required=True)
parser.add_argument('--user', default='guest')
parser.add_argument('--password', default='guest')
parser.add_argument('--vhost', default='/')
parser.add_argument('--log')
parser.add_argument('--max-seconds', type=float, default=3600)
parser.add_argument('--max-length', type=int,
                    help='declare: the queue holds at most this many messages and rejects '
                    'further publishes (x-overflow reject-publish: publishers get basic.nack)')
parser.add_argument('command')
parser.add_argument('args', nargs='*')
opts = parser.parse_args()


def connect():
    return pika.BlockingConnection(pika.ConnectionParameters(
        host='127.0.0.1', port=opts.port, virtual_host=opts.vhost,
        credentials=pika.PlainCredentials(opts.user, opts.password),
        connection_attempts=1, socket_timeout=5, blocked_connection_timeout=30))


def declare(exchange, queue, *bindings):
    conn = connect()
    ch = conn.channel()
    ch.exchange_declare(exchange, 'topic', durable=True)
    args = None
    if opts.max_length is not None:
        args = {'x-max-length': opts.max_length, 'x-overflow': 'reject-publish'}
    ch.queue_declare(queue, durable=True, arguments=args)
    for b in bindings:
        ch.queue_bind(queue, exchange, b)
    conn.close()


def delete_exchange(exchange):
    conn = connect()
    conn.channel().exchange_delete(exchange)
    conn.close()


def count(queue):
    conn = connect()
    q = conn.channel().queue_declare(queue, durable=True, passive=True)
    print(q.method.message_count)
    conn.close()


stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True


def consume(queue):
    deadline = time.time() + opts.max_seconds
    signal.signal(signal.SIGTERM, on_term)
    with open(opts.log, 'a', buffering=1) as log:
        while not stopping and time.time() < deadline:
            try:
                conn = connect()
                ch = conn.channel()
                ch.basic_qos(prefetch_count=1000)
                for method, props, body in ch.consume(queue, inactivity_timeout=0.2):
                    if stopping or time.time() >= deadline:
                        break
                    if method is None:
                        continue
                    log.write(json.dumps({
                        't': time.time() * 1000,
                        'id': props.message_id,
                        'exchange': method.exchange,
                        'routing_key': method.routing_key,
                        'redelivered': method.redelivered,
                        'type': props.type,
                        'content_type': props.content_type,
                        'delivery_mode': props.delivery_mode,
                        'app_id': props.app_id,
                        'timestamp': props.timestamp,
                        'headers': props.headers or {},
                        'body': body.decode('utf-8'),
                    }) + '\n')
                    ch.basic_ack(method.delivery_tag)
                try:
                    conn.close()
                except Exception:
                    pass
            except (pika.exceptions.AMQPError, OSError):
                time.sleep(0.2)


commands = {'declare': declare, 'delete-exchange': delete_exchange, 'count': count,
            'consume': consume}
if opts.command not in commands:
    sys.exit('unknown command ' + opts.command)
commands[opts.command](*opts.args)
