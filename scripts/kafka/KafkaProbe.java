// Readiness probe for the dev broker, used by scripts/services only when the
// project venv (and so confluent_kafka) is not there yet, e.g. services started
// before `pip install`. Run as a single-file program against the broker's own
// classpath, so it needs nothing beyond what scripts/kafka/pom.xml fetched:
//
//   java -cp '.services/kafka/libs/*' scripts/kafka/KafkaProbe.java BOOTSTRAP DEADLINE_S [PID]
//
// Exit codes: 0 ready, 1 deadline passed, 2 the broker process (PID) died.

import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterOptions;

public class KafkaProbe {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        long pid = args.length > 2 ? Long.parseLong(args[2]) : -1;

        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        // Keep every call short so the loop (not a client default of minutes)
        // decides how long we wait.
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        props.put(AdminClientConfig.SOCKET_CONNECTION_SETUP_TIMEOUT_MS_CONFIG, "1000");
        props.put(AdminClientConfig.SOCKET_CONNECTION_SETUP_TIMEOUT_MAX_MS_CONFIG, "2000");
        props.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "500");

        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                if (pid > 0 && ProcessHandle.of(pid).map(p -> !p.isAlive()).orElse(true)) {
                    System.exit(2);
                }
                try {
                    int n = admin.describeCluster(new DescribeClusterOptions().timeoutMs(3000))
                            .nodes().get(4, TimeUnit.SECONDS).size();
                    if (n > 0) {
                        System.exit(0);
                    }
                } catch (Exception notYet) {
                    // Broker still starting: retry until the deadline.
                }
                Thread.sleep(500);
            }
        }
        System.exit(1);
    }
}
