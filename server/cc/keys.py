"""Every Redis key of the command center, built in one place.

Accounts are hashes keyed by email (managers) or username (donors); a token
is never stored, only sha256(token) -> account. Targets are hashes plus
index sets (all, by owner, by stage) so listing and assignment never scan
everything. Stream bytes live on the workservers; the CC keeps only which
target and WS each stream belongs to, and per-target per-WS counts.
Target files live here too, not on a CC's disk: any CC host serves them.

    workservers                set of ws names
    ws:<name>                  hash: url, http_port, online ('1'/'0'),
                               fails (consecutive), disconnected ('1'
                               after a goodbye), source (the address it
                               registered from); workservers.Workserver
    ws:<name>:pending_deletes  set of target ids deleted while the WS did
                               not answer; kept when the WS is removed
                               (PUT /ws/remove), replayed if it comes back
    ws:<name>:abandoned        zset: stream id whose creation on the WS the
                               CC gave up on (no answer) -> when; deleted
                               there when it answers again
    reconcile:stats            hash: repair (adopted, forgotten, ...) ->
                               count, ever (server/cc/reconcile.py)
    manager:<email id>         hash: email, role, weight, password
                               (scrypt), token (sha256 hex)
    manager_token:<sha256>     string: email of the manager of the token
    donor:<username>           hash: username, email, password (scrypt),
                               token (sha256 hex)
    donor_email:<email id>     string: username of the donor with this
                               email (uniqueness)
    donor_token:<sha256>       string: username of the donor of the token
    targets                    set of every target id
    target:<id>                hash: owner, description, creation_date,
                               stage, engine, weight and JSON fields
                               engine_versions, allowed_ws, options, files
                               (targets.Target)
    manager:<email id>:targets set of the target ids a manager owns
    targets:stage:<stage>      set of the target ids in a stage (private,
                               beta, public)
    target:<id>:files          hash: file name -> the file as the manager
                               sent it (JSON string text), so that every
                               CC host serves and forwards it
    target_bytes               hash: manager email -> bytes of its targets'
                               files (with those being created), the
                               per-manager quota (targets.py)
    target_bytes:all           string: the same summed over every manager
    lease:jobs                 string: "host:pid:random" of the CC process
                               running the periodic jobs (probes, deletion
                               replays), expiring (server/lease.py)
    target:<id>:ws             hash: ws name -> number of the target's
                               streams on it (placed or being placed)
    target:<id>:ws_files       set of the WS that hold the target's files
    target:<id>:streams        set of the target's stream ids
    stream:<id>                hash: target_id, ws (stream_map.py)
    admins                     set of the admins' emails (once not empty,
                               loopback bootstrap of managers is closed)
    login_fails:<scope>:<name> string with a TTL: failed logins of an
                               account (scope manager or donor) or an
                               address (scope addr) in the current window
    client:<client>:held       zset: a client's holds (a session id, or an
                               assignment's uuid until its activation
                               names its session) -> when they stop
                               counting at the latest (unix); a client
                               is 'key:<core key id>', 'donor:<username>'
                               or 'addr:<ip>' (an IPv6 address by its /64)
    client:<client>:rate       string with a TTL: assignments the client
                               asked for in the current minute
    hold:<session id>          string with a TTL: the client whose hold
                               the session is (a member of its held set),
                               until the session's record comes (assign.py)

Core keys (corekeys.py), stored hashed like tokens:

    core_keys                  set of the ids of live keys
    core_key:<key_id>          hash: engine, description, creation_date,
                               last_used, revoked ('0'/'1'; a revoked key
                               is kept so its cores hear why they are
                               refused)
    core_key_hash:<sha256>     string: id of the core key of that hash

Stats (stats.py, collect.py, status.py), kept as session records arrive:

    stats:seen:<session id>    string with a TTL: the record is stored
    stats:sessions             stream: session records (capped)
    stats:donors:frames        zset: username -> frames
    stats:donor:<username>     hash: frames, sessions, last_seen
    stats:donor:<username>:targets   set of the targets the donor worked on
    stats:target:<id>          hash: frames, sessions, end:<reason> ->
                               sessions ended so
    stats:target:<id>:donors   set of the donors who worked on it
    stats:target:<id>:hours    hash: unix hour -> frames of the sessions
                               that ended in it
    stats:ws:<name>            hash: frames, sessions recorded from it
    ws:<name>:report           hash: the WS's last report: time,
                               disk_free_mb and JSON fields streams ({ok,
                               active, stopped}), targets ({id: {queued,
                               active, stopped}}), per_minute ({minute:
                               {frames, errors}})
    stats:per-minute:<what>    hash: unix minute -> assignments or no_work
                               counted by the CC (minutes over two hours
                               old are dropped by collect.py)

`keys.ws(name)` is a key; `keys.ws.template` is the same key with '%s' in
place of the name, for a Lua script that walks from one key to another
(`string.format`), so that every name stays defined here.

An email goes into a key as its id, sha1(email) in hex, never as text: an
email may hold `:` and must not make one key look like another
(`manager:<email>` against `manager:<email>:targets`). Lua reaches the same
key with `string.format(template, redis.sha1hex(email))`. Other names in
keys match patterns without `:` (usernames, WS names) or are ids the
servers make.
"""
import hashlib

from server.store import Key


class EmailKey(Key):
    """A key named by an email: `key(email)` puts in its id."""

    def __call__(self, email):
        return self.template % hashlib.sha1(email.encode('utf-8')).hexdigest()


# workservers
WORKSERVERS = 'workservers'
ws = Key('ws:%s')
ws_pending_deletes = Key('ws:%s:pending_deletes')
ws_abandoned = Key('ws:%s:abandoned')
RECONCILE_STATS = 'reconcile:stats'
JOBS_LEASE = 'lease:jobs'

# accounts
manager = EmailKey('manager:%s')
manager_token = Key('manager_token:%s')
admins = 'admins'
donor = Key('donor:%s')
donor_email = EmailKey('donor_email:%s')
donor_token = Key('donor_token:%s')

# targets and streams
TARGETS = 'targets'
target = Key('target:%s')
target_files = Key('target:%s:files')
TARGET_BYTES = 'target_bytes'
TARGET_BYTES_ALL = 'target_bytes:all'
owner_targets = EmailKey('manager:%s:targets')
stage_targets = Key('targets:stage:%s')
target_ws = Key('target:%s:ws')
target_ws_files = Key('target:%s:ws_files')
target_streams = Key('target:%s:streams')
stream = Key('stream:%s')

# abuse controls
login_fails = Key('login_fails:%s:%s')
client_held = Key('client:%s:held')
client_rate = Key('client:%s:rate')
hold = Key('hold:%s')

# core keys
CORE_KEYS = 'core_keys'
core_key = Key('core_key:%s')
core_key_hash = Key('core_key_hash:%s')

# stats: sessions and their sums
session_seen = Key('stats:seen:%s')
SESSIONS = 'stats:sessions'
DONORS_BY_FRAMES = 'stats:donors:frames'
donor_stats = Key('stats:donor:%s')
donor_targets = Key('stats:donor:%s:targets')

# stats: per target and per WS
target_stats = Key('stats:target:%s')
target_donors = Key('stats:target:%s:donors')
target_hours = Key('stats:target:%s:hours')
ws_stats = Key('stats:ws:%s')
ws_report = Key('ws:%s:report')
per_minute = Key('stats:per-minute:%s')
