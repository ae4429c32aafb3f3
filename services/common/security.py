"""The command-line side of transport security, the same for every service: TLS for the server it
runs and for the channels it opens, and the explicit opt-out of authentication (docs/security.md)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from services.common.rpc import ClientTLS, ServerTLS, set_client_tls


@dataclass(frozen=True)
class Transport:
    """What a service's server is started with."""
    tls: ServerTLS | None = None
    insecure_no_auth: bool = False


def add_security_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("security", "see docs/security.md")
    g.add_argument("--insecure-no-auth", action="store_true",
                   help="serve beyond loopback without RLGRID_AUTH_TOKEN (anyone who reaches the port may call it)")
    g.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    g.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    g.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: require every client to present a certificate signed by this CA")
    g.add_argument("--tls-ca", metavar="PEM", help="call other services over TLS, trusting this CA")
    g.add_argument("--tls-client-cert", metavar="PEM", help="mutual TLS: the certificate this service presents")
    g.add_argument("--tls-client-key", metavar="PEM", help="the private key of --tls-client-cert")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="the name the other services' certificates carry, when they are reached by IP or by a "
                        "name the certificates do not list")


def transport_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Transport:
    """Checks the flags (parser.error on a bad combination), sets this process's client TLS and
    returns what its server is started with."""
    def pair(a: str, b: str) -> None:
        if bool(getattr(args, a)) != bool(getattr(args, b)):
            parser.error(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} go together")
    pair("tls_cert", "tls_key")
    pair("tls_client_cert", "tls_client_key")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert/--tls-key")
    if (args.tls_client_cert or args.tls_server_name) and not args.tls_ca:
        parser.error("--tls-client-cert and --tls-server-name need --tls-ca (TLS for the channels this service opens)")
    if args.tls_ca:
        set_client_tls(ClientTLS(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name))
    server = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return Transport(server, args.insecure_no_auth)
