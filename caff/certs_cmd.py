"""``caff certs``: a CA, the SuperLink's TLS certificate and SuperNode keys for a secure deployment."""

from __future__ import annotations


def add_parser(subparsers) -> dict:
    certs = subparsers.add_parser("certs", help="make TLS certificates and SuperNode keys for a Flower deployment")
    certs.add_argument("out", help="folder to write them to (must not hold them already)")
    certs.add_argument("--host", action="append", required=True,
                       help="a name or IP address nodes use to reach the SuperLink (repeat for several)")
    certs.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make: node-0, node-1, ...")
    certs.add_argument("--days", type=int, default=365, help="days the certificates are valid")
    return {"certs": run_certs}


def run_certs(args) -> int:
    if args.nodes < 0 or args.days < 1:
        raise ValueError("--nodes must be >= 0 and --days >= 1")
    from trainer.certs import make_certificates, make_node_key

    made = make_certificates(args.out, args.host, args.days)
    keys = [make_node_key(args.out, f"node-{i}") for i in range(args.nodes)]
    print(f"CA {made['ca']} (its key {made['ca_key']}: keep it off the servers)")
    print(f"SuperLink certificate {made['server']} and key {made['server_key']} for {', '.join(args.host)}")
    for private, public in keys:
        print(f"SuperNode key {private} (stays on the node), public key {public} (register it on the SuperLink)")
    return 0
