"""
The reverse tunnel (frp-style): agents behind NAT dial the control port,
users connect to the public port, and the server splices each public
connection to a fresh connection the chosen agent opens to the proxy port.
See L{rproxy.tunnel.wire} for the protocol.
"""
