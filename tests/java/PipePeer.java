// A minimal wrapper-side peer of the splitpilot agent <-> wrapper pipe,
// written against the Java classes protoc generates from proto/. The test
// tests/test_java_peer.py compiles it (with Debian's protoc and
// libprotobuf-java) and runs it as the agent's child, so the pipe is checked
// against a second, independent protobuf implementation.
//
//   java -cp <classes>:<protobuf.jar> PipePeer              play one job
//   java -cp <classes>:<protobuf.jar> PipePeer --reencode   echo AgentMessage frames
//
// Default mode (stdin: AgentMessage frames, stdout: WrapperMessage frames):
//   write Ready; read Hello (protocol_major must be 1, else Error
//   ERROR_CODE_VERSION and exit 3); read JobStart; write StateChange STARTED,
//   StateChange RUNNING and a Heartbeat whose fields are derived from the
//   JobStart (so the agent can tell its bytes were parsed); read Stop; write
//   Result (FAILED_WRAPPER / STOPPED / signal 15); read to end of file; exit 0.
//   Anything else (another message, end of file too early, bytes that do not
//   parse) goes to stderr and ends the process with exit status 2.
//
// --reencode: parse AgentMessage frames from stdin until end of file and
//   write each back with writeDelimitedTo, so the agent can compare its own
//   frames with the bytes Java produces for the same messages.
//
// Only frames ever reach fd 1: System.out is pointed at stderr before
// anything else runs, and frames go to fd 1 through a stream of our own.

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.util.Map;
import java.util.TreeMap;

import org.splitpilot.job.v1.InputFile;
import org.splitpilot.job.v1.JobSpec;
import org.splitpilot.job.v1.JobState;
import org.splitpilot.pipe.v1.AgentMessage;
import org.splitpilot.pipe.v1.Error;
import org.splitpilot.pipe.v1.ErrorCode;
import org.splitpilot.pipe.v1.FailureClass;
import org.splitpilot.pipe.v1.Heartbeat;
import org.splitpilot.pipe.v1.JobStart;
import org.splitpilot.pipe.v1.Ready;
import org.splitpilot.pipe.v1.Result;
import org.splitpilot.pipe.v1.StateChange;
import org.splitpilot.pipe.v1.Stop;
import org.splitpilot.pipe.v1.WrapperMessage;

public final class PipePeer {
    static final int PROTOCOL_MAJOR = 1;
    static final int PROTOCOL_MINOR = 0;

    /** Exit status for an unexpected message or a broken stream. */
    static final int EXIT_UNEXPECTED = 2;
    /** Exit status after answering a Hello of another major version. */
    static final int EXIT_VERSION = 3;

    private final InputStream in;
    private final OutputStream out;

    private PipePeer(InputStream in, OutputStream out) {
        this.in = in;
        this.out = out;
    }

    public static void main(String[] args) throws IOException {
        // fd 1 carries frames only: whatever prints later lands on stderr.
        OutputStream frames = new BufferedOutputStream(new FileOutputStream(FileDescriptor.out), 64 * 1024);
        System.setOut(System.err);
        InputStream in = new BufferedInputStream(new FileInputStream(FileDescriptor.in), 64 * 1024);
        PipePeer peer = new PipePeer(in, frames);
        int status;
        try {
            if (args.length == 0) {
                status = peer.playJob();
            } else if (args.length == 1 && args[0].equals("--reencode")) {
                status = peer.reencode();
            } else {
                System.err.println("PipePeer: usage: PipePeer [--reencode]");
                status = 64;
            }
        } catch (IOException e) {
            // Includes InvalidProtocolBufferException: bytes that are not a frame of the schema.
            System.err.println("PipePeer: I/O or decoding error: " + e);
            status = EXIT_UNEXPECTED;
        }
        frames.flush();
        System.exit(status);
    }

    // ------------------------------------------------------------- job mode

    private int playJob() throws IOException {
        send(WrapperMessage.newBuilder().setReady(Ready.newBuilder()
                .setProtocolMajor(PROTOCOL_MAJOR)
                .setProtocolMinor(PROTOCOL_MINOR)
                .setPid((int) ProcessHandle.current().pid())
                .addCapabilities("java-peer")
                .setSoftwareVersion("PipePeer (protobuf-java)")).build());

        AgentMessage msg = read("Hello");
        if (msg.getKindCase() != AgentMessage.KindCase.HELLO) {
            return unexpected(msg, "Hello");
        }
        if (msg.getHello().getProtocolMajor() != PROTOCOL_MAJOR) {
            send(WrapperMessage.newBuilder().setError(Error.newBuilder()
                    .setCode(ErrorCode.ERROR_CODE_VERSION)
                    .setMessage("PipePeer speaks pipe protocol " + PROTOCOL_MAJOR + "." + PROTOCOL_MINOR
                            + ", the agent " + Integer.toUnsignedString(msg.getHello().getProtocolMajor())
                            + "." + Integer.toUnsignedString(msg.getHello().getProtocolMinor()))).build());
            return EXIT_VERSION;
        }

        msg = read("JobStart");
        if (msg.getKindCase() != AgentMessage.KindCase.JOB_START) {
            return unexpected(msg, "JobStart");
        }
        JobStart job = msg.getJobStart();
        JobSpec spec = job.getSpec();
        String jobId = Long.toUnsignedString(job.getJobId());

        send(WrapperMessage.newBuilder().setStateChange(StateChange.newBuilder()
                .setState(JobState.JOB_STATE_STARTED)
                .setDetail("job " + jobId + " attempt " + Integer.toUnsignedString(job.getAttempt())
                        + " executable " + spec.getExecutable())
                .setTimeUnixMs(System.currentTimeMillis())).build());
        send(WrapperMessage.newBuilder().setStateChange(StateChange.newBuilder()
                .setState(JobState.JOB_STATE_RUNNING)
                .setDetail(describe(job))
                .setTimeUnixMs(System.currentTimeMillis())).build());
        long inputBytes = 0;
        for (InputFile f : spec.getInputFilesList()) {
            inputBytes += f.getSize();
        }
        send(WrapperMessage.newBuilder().setHeartbeat(Heartbeat.newBuilder()
                .setPayloadPid(job.getAttempt())
                .setCpuSeconds(1.5)
                .setRssBytes(job.getJobId() * 1000)
                .setSandboxBytes(spec.getArgumentsCount())
                .setWallSeconds((double) spec.getRequirements().getWalltimeS())
                .setProcesses(spec.getEnvironmentCount())
                .setTimeUnixMs(inputBytes)).build());

        msg = read("Stop");
        if (msg.getKindCase() != AgentMessage.KindCase.STOP) {
            return unexpected(msg, "Stop");
        }
        Stop stop = msg.getStop();
        send(WrapperMessage.newBuilder().setResult(Result.newBuilder()
                .setFinalState(JobState.JOB_STATE_FAILED_WRAPPER)
                .setSignal(15)
                .setFailureClass(FailureClass.FAILURE_CLASS_STOPPED)
                .setMessage("stopped: " + stop.getReason().name() + ": " + stop.getDetail()
                        + " (deadline " + Integer.toUnsignedString(stop.getDeadlineS()) + " s)")
                .setCpuSeconds(1.5)
                .setMaxRssBytes(job.getJobId() * 1000)).build());

        // Result was the last message; the agent now only closes our stdin.
        AgentMessage extra = AgentMessage.parseDelimitedFrom(in);
        if (extra != null) {
            return unexpected(extra, "end of file");
        }
        return 0;
    }

    /** Everything of the spec a reader can check, in a fixed order. */
    private static String describe(JobStart job) {
        JobSpec spec = job.getSpec();
        StringBuilder s = new StringBuilder();
        s.append("args=").append(String.join("|", spec.getArgumentsList()));
        s.append(" env=");
        String sep = "";
        for (Map.Entry<String, String> e : new TreeMap<>(spec.getEnvironmentMap()).entrySet()) {
            s.append(sep).append(e.getKey()).append('=').append(e.getValue());
            sep = ",";
        }
        s.append(" inputs=");
        sep = "";
        for (InputFile f : spec.getInputFilesList()) {
            s.append(sep).append(f.getName()).append(':').append(Long.toUnsignedString(f.getSize()))
                    .append(':').append(f.getSha256());
            sep = ",";
        }
        s.append(" cores=").append(Integer.toUnsignedString(spec.getRequirements().getCores()));
        s.append(" memory_mb=").append(Long.toUnsignedString(spec.getRequirements().getMemoryMb()));
        s.append(" sites=").append(String.join("|", spec.getRequirements().getSitesAllowedList()));
        s.append(" sandbox=").append(job.getSandboxDir());
        return s.toString();
    }

    // -------------------------------------------------------- reencode mode

    private int reencode() throws IOException {
        AgentMessage msg;
        while ((msg = AgentMessage.parseDelimitedFrom(in)) != null) {
            msg.writeDelimitedTo(out);
        }
        return 0;
    }

    // -------------------------------------------------------------- helpers

    private void send(WrapperMessage msg) throws IOException {
        msg.writeDelimitedTo(out);
        out.flush();
    }

    /** The next frame; a clean end of file here is as unexpected as a wrong message. */
    private AgentMessage read(String expected) throws IOException {
        AgentMessage msg = AgentMessage.parseDelimitedFrom(in);
        if (msg == null) {
            System.err.println("PipePeer: end of file where " + expected + " was expected");
            out.flush();
            System.exit(EXIT_UNEXPECTED);
        }
        return msg;
    }

    private static int unexpected(AgentMessage msg, String expected) {
        System.err.println("PipePeer: unexpected " + msg.getKindCase() + " where " + expected
                + " was expected: " + msg);
        return EXIT_UNEXPECTED;
    }
}
