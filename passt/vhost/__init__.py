"""vhost-user: passt serves the guest's virtio-net rings in shared memory (--vhost-user).

`protocol` (the wire format), `memory` (guest regions, bounds-checked),
`virtqueue` (split rings, notifications), `device` (what each message
does), `tap` (the tap backend over the rings), `connection` (one front-end
on the socket), `session` (passt's session with vhost-user guests).
"""
