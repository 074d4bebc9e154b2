"""
The states of an exchange (one request and its response), in order.

An L{rproxy.http.exchange.Exchange} has one C{state} field; these are its
values and the transitions the engine makes (each a named method there):

    ROUTING     filters' request and choose-upstream phases (a filter may
                wait, e.g. for a token lease)      -> PICKING, DONE
    PICKING     waiting for a server slot          -> CONNECTING, DONE
    CONNECTING  waiting for an upstream connection -> SENDING, AWAITING,
                                                      PICKING (retry), DONE
    SENDING     request head sent, body flowing    -> AWAITING, DUPLEX,
                                                      SWITCHING, DONE
    AWAITING    request complete, no response head -> RESPONDING,
                                                      SWITCHING, PICKING
                                                      (retry), DONE
    DUPLEX      response streaming, the request body still flowing (the
                server answered early)             -> RESPONDING, DONE
    RESPONDING  response streaming, request done   -> DONE
    SWITCHING   101 read, its head not yet passed  -> UPGRADED, DONE
    UPGRADED    the two connections are spliced (terminal)
    DONE        answered, failed or abandoned (terminal)

Plain integers, ordered, so that the hot path can test a range
(C{DUPLEX <= state <= RESPONDING}: a response body is streaming).
"""

from __future__ import annotations

__all__ = ["ROUTING", "PICKING", "CONNECTING", "SENDING", "AWAITING", "DUPLEX", "RESPONDING", "SWITCHING",
           "UPGRADED", "DONE", "NAMES"]

ROUTING = 0
PICKING = 1
CONNECTING = 2
SENDING = 3
AWAITING = 4
DUPLEX = 5
RESPONDING = 6
SWITCHING = 7
UPGRADED = 8
DONE = 9

NAMES = ("ROUTING", "PICKING", "CONNECTING", "SENDING", "AWAITING", "DUPLEX", "RESPONDING", "SWITCHING",
         "UPGRADED", "DONE")
