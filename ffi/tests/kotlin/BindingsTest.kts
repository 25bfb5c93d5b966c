// The generated Kotlin bindings, driven against a real tern-server over QUIC on loopback.
// Run by ffi/tests/run.sh: `kotlinc -script BindingsTest.kts` with the bindings jar, JNA and
// kotlinx-coroutines on the classpath. Sections between "README:" markers are quoted in
// ffi/README.md; run.sh checks that they match.

import dev.tern.*
import java.io.File
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
import kotlinx.coroutines.runBlocking

val serverBin = System.getenv("TERN_SERVER_BIN") ?: error("TERN_SERVER_BIN is not set")
val timeoutMs = 10_000L

// --- A real server: free port, own data directory, development certificates. ---

class TernServer {
    val dir: File = kotlin.io.path.createTempDirectory("tern-ffi-kt-").toFile()
    val port: Int = java.net.DatagramSocket(0, java.net.InetAddress.getByName("127.0.0.1"))
        .use { it.localPort }
    private val globalArgs = listOf("--data-dir", "$dir/data", "--certs-dir", "$dir/certs")
    val process: Process = ProcessBuilder(
        listOf(serverBin) + globalArgs + listOf("--listen", "127.0.0.1:$port", "run"),
    ).redirectErrorStream(true).redirectOutput(File(dir, "server.log")).start()
    val caPem: String

    init {
        val ca = File(dir, "certs/ca.pem")
        val deadline = System.currentTimeMillis() + 30_000
        while (!ca.exists() || !File(dir, "data/jwt.secret").exists()) {
            check(process.isAlive && System.currentTimeMillis() < deadline) {
                "tern-server did not start: " + File(dir, "server.log").readText()
            }
            Thread.sleep(50)
        }
        caPem = ca.readText()
    }

    fun token(user: String, device: String = "phone"): String {
        val p = ProcessBuilder(listOf(serverBin) + globalArgs + listOf("token", "--user", user, "--device", device))
            .redirectError(ProcessBuilder.Redirect.INHERIT).start()
        val out = p.inputStream.bufferedReader().readText().trim()
        check(p.waitFor() == 0) { "token failed" }
        return out
    }

    fun config(user: String, device: String = "phone", token: String = token(user, device)) =
        TernConfig(server = "127.0.0.1:$port", token = token, caPem = caPem, serverName = "localhost")

    fun stop() {
        process.destroyForcibly().waitFor()
        dir.deleteRecursively()
    }
}

// --- A listener that records events, as an app's would forward them to its UI. ---

// README: listener
class ChatListener : TernListener {
    val events = LinkedBlockingQueue<Any>()

    override fun onMessage(message: ChatMessage, inboxSeq: ULong) { events.put(message) }
    override fun onReceipt(receipt: Receipt, inboxSeq: ULong) { events.put(receipt) }
    override fun onConversationEvent(event: ConversationEvent, inboxSeq: ULong) { events.put(event) }
    override fun onPresence(presence: Presence) { events.put(presence) }
    override fun onTyping(typing: Typing) { events.put(typing) }
    override fun onConnectionState(state: ConnectionState) { events.put(state) }
    override fun onSyncTooLong(inboxHead: ULong) { events.put("sync too long: $inboxHead") }
}
// README: end

/** The first event of type T that satisfies `match`; others are skipped. */
inline fun <reified T> ChatListener.expect(noinline match: (T) -> Boolean = { true }): T {
    val deadline = System.currentTimeMillis() + timeoutMs
    val seen = mutableListOf<Any>()
    while (true) {
        val left = deadline - System.currentTimeMillis()
        check(left > 0) { "no ${T::class.simpleName} matched in ${timeoutMs}ms; saw $seen" }
        val event = events.poll(left, TimeUnit.MILLISECONDS) ?: continue
        seen.add(event)
        if (event is T && match(event)) return event
    }
}

val server = TernServer()
var passed = 0
var failed = 0

fun test(name: String, body: suspend () -> Unit) {
    try {
        runBlocking { body() }
        passed++
        println("test $name ... ok")
    } catch (e: Throwable) {
        failed++
        println("test $name ... FAILED")
        e.printStackTrace(System.out)
    }
}

val serverAddress = "127.0.0.1:${server.port}"
val caPem: String? = server.caPem // null for a server with a publicly trusted certificate

suspend fun connect(user: String, device: String = "phone"): Pair<TernClient, ChatListener> {
    val token = server.token(user, device) // in an app, the app's backend mints this
    // README: connect
    val listener = ChatListener()
    val client = TernClient.connect(
        TernConfig(server = serverAddress, token = token, caPem = caPem, serverName = "localhost"),
        listener,
    )
    // README: end
    listener.expect<ConnectionState> { it is ConnectionState.Connected }
    return client to listener
}

test("conversation, receipts, presence, typing, network change") {
    val (alice, aliceEvents) = connect("alice")
    val (bob, bobEvents) = connect("bob")
    check(alice.session().user == "alice")

    // README: send
    val sent = alice.sendToUser("bob", "hello bob")
    println("stored as ${sent.messageId} (seq ${sent.seq})")
    // README: end
    check(sent.conversationId == "d:alice:bob" && sent.seq == 1UL)
    val received = bobEvents.expect<ChatMessage>()
    check(received.sender == "alice" && received.text == "hello bob")

    aliceEvents.expect<Receipt> { it.kind == ReceiptKind.DELIVERED && it.upToSeq >= 1UL }
    // README: read
    bob.markRead(received.conversationId, received.seq)
    // README: end
    aliceEvents.expect<Receipt> { it.kind == ReceiptKind.READ && it.userId == "bob" && it.upToSeq == 1UL }

    alice.setPresence(PresenceStatus.AWAY)
    bobEvents.expect<Presence> { it.userId == "alice" && it.status == PresenceStatus.AWAY }
    bob.typing(sent.conversationId)
    val typing = aliceEvents.expect<Typing>()
    check(typing.userId == "bob" && typing.conversationId == "d:alice:bob")

    // The network changes in the middle of the conversation: the session migrates, nothing
    // is lost or reordered, and no new session is made.
    val sessionBefore = alice.session().sessionId
    val first = alice.sendToUser("bob", "before the switch")
    // README: network
    alice.networkChanged() // from the app's ConnectivityManager.NetworkCallback
    // README: end
    val second = alice.sendToUser("bob", "after the switch")
    check(second.seq == first.seq + 1UL)
    check(bobEvents.expect<ChatMessage>().text == "before the switch")
    check(bobEvents.expect<ChatMessage>().text == "after the switch")
    check(alice.ping() > 0.0)
    check(alice.session().sessionId == sessionBefore)

    val history = bob.history(sent.conversationId, 0UL, 10u)
    check(history.messages.map { it.text } == listOf("after the switch", "before the switch", "hello bob"))

    // README: lifecycle
    alice.setBackground(true) // from onStop(); setBackground(false) from onStart()
    alice.disconnect() // the user logged out: acknowledge what was received, then close
    // README: end
    aliceEvents.expect<ConnectionState> { it is ConnectionState.Disconnected }
    try {
        alice.sendToUser("bob", "too late")
        error("send after disconnect succeeded")
    } catch (e: TernException.Closed) {
    }
    bob.disconnect()
    alice.close()
    bob.close()
}

test("group") {
    val (carol, carolEvents) = connect("carol")
    val (dave, daveEvents) = connect("dave")
    // README: group
    val group = carol.createGroup("team", listOf("dave"))
    carol.send(group.conversationId, "hi team")
    // README: end
    check(group.kind == ConversationKind.GROUP)
    check(group.members.map { it.userId }.sorted() == listOf("carol", "dave"))
    val created = daveEvents.expect<ConversationEvent>()
    check(created.kind == ConversationEventKind.CREATED && created.actor == "carol")
    val hi = daveEvents.expect<ChatMessage>()
    check(hi.conversationId == group.conversationId && hi.text == "hi team")

    carol.addMembers(group.conversationId, listOf("erin"))
    val left = dave.leaveGroup(group.conversationId)
    check(left.members.map { it.userId }.sorted() == listOf("carol", "erin"))
    try {
        dave.send(group.conversationId, "not a member any more")
        error("send to a group after leaving succeeded")
    } catch (e: TernException.Server) {
        check(e.code == TernErrorCode.FORBIDDEN) { "got ${e.code}" }
    }
    check(carol.conversations().any { it.conversationId == group.conversationId })
    carol.close()
    dave.close()
}

test("a bad token is a typed error") {
    // README: errors
    try {
        TernClient.connect(server.config("mallory", token = "not.a.jwt"), ChatListener())
        error("connected with a bad token")
    } catch (e: TernException.Server) {
        // e.code says why: TOKEN_INVALID, TOKEN_EXPIRED... (ask the backend for a new token)
        check(e.code == TernErrorCode.TOKEN_INVALID) { "got ${e.code}" }
    }
    // README: end
}

/** Threads the bindings started (the JVM's own come and go), and UDP sockets. */
fun ternThreads() = File("/proc/self/task").listFiles()!!.count {
    runCatching { File(it, "comm").readText().startsWith("tern-") }.getOrDefault(false)
}
fun sockets() = File("/proc/self/fd").listFiles()!!.count {
    runCatching { java.nio.file.Files.readSymbolicLink(it.toPath()).toString().startsWith("socket:") }
        .getOrDefault(false)
}

fun settle(maxThreads: Int, maxSockets: Int) {
    val deadline = System.currentTimeMillis() + 20_000
    while (System.currentTimeMillis() < deadline) {
        val live = liveClients()
        if (live.objects == 0UL && live.sessions == 0UL && ternThreads() <= maxThreads && sockets() <= maxSockets) return
        Thread.sleep(100)
    }
    error("leak: ${liveClients()}, tern threads ${ternThreads()} (max $maxThreads), sockets ${sockets()} (max $maxSockets)")
}

test("dropped clients leak no threads, connections or sockets") {
    suspend fun churn(rounds: Int) {
        for (i in 0 until rounds) {
            val (client, _) = connect("leaky", device = "d${i % 3}")
            client.sendToUser("alice", "churn $i")
            client.close() // frees the Rust object: the connection closes
        }
    }
    churn(2) // warm up: the runtime's worker threads start on first use
    settle(maxThreads = 16, maxSockets = sockets() + 4)
    val threads = ternThreads()
    val socketCount = sockets()
    churn(40)
    // An idle blocking-pool thread of the runtime may linger for a second; allow one.
    settle(maxThreads = threads + 1, maxSockets = socketCount)
}

server.stop()
println("$passed passed, $failed failed")
if (failed > 0) kotlin.system.exitProcess(1)
