package bench;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.StateRestoreListener;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The benchmark's stateful count on Kafka Streams: per key, the count of records and the sum of
 * their JSON "amount", emitted as {"count":c,"sum":s} under the key for every input record
 * (examples/src/bench/workload.rs computes the same on exactly). Exactly-once v2, state in
 * RocksDB under the given directory, default settings otherwise; the store's record cache is
 * off only because with it, Kafka Streams emits one update per key per commit instead of one
 * per record, which is not the same computation.
 *
 * <p>Arguments: bootstrap-servers input-topic output-topic application-id state-dir threads.
 * Runs until SIGTERM, then closes (committing) and exits. Prints {@code KSTREAMS-RESTORED
 * records=N ms=T} when it has restored a store partition from its changelog (the benchmark's
 * restore case starts it with an empty state directory).
 */
public final class KStreamsCount {
    private static final ObjectMapper JSON = new ObjectMapper();

    public static void main(String[] args) throws InterruptedException {
        if (args.length != 6) {
            System.err.println(
                    "usage: KStreamsCount <bootstrap> <input> <output> <application-id> <state-dir> <threads>");
            System.exit(2);
        }
        Properties p = new Properties();
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, args[3]);
        p.put(StreamsConfig.STATE_DIR_CONFIG, args[4]);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, Integer.parseInt(args[5]));
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);

        StreamsBuilder builder = new StreamsBuilder();
        builder.stream(args[1], Consumed.with(Serdes.String(), Serdes.ByteArray()))
                .groupByKey(Grouped.with(Serdes.String(), Serdes.ByteArray()))
                .aggregate(
                        () -> totals(0, 0),
                        (key, value, totals) -> {
                            ByteBuffer t = ByteBuffer.wrap(totals);
                            return totals(t.getLong() + 1, t.getLong() + amount(value));
                        },
                        Materialized.<String, byte[], KeyValueStore<Bytes, byte[]>>as("totals")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(Serdes.ByteArray())
                                .withCachingDisabled())
                .toStream()
                .mapValues(KStreamsCount::json)
                .to(args[2], Produced.with(Serdes.String(), Serdes.ByteArray()));

        KafkaStreams streams = new KafkaStreams(builder.build(), p);
        CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close();
            closed.countDown();
        }));
        streams.setGlobalStateRestoreListener(new RestoreTimer());
        streams.setUncaughtExceptionHandler(e -> {
            e.printStackTrace();
            return org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler
                    .StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.start();
        closed.await();
    }

    /** Prints how long restoring each store partition from its changelog took. */
    private static final class RestoreTimer implements StateRestoreListener {
        private final java.util.Map<TopicPartition, Long> started =
                new java.util.concurrent.ConcurrentHashMap<>();

        @Override
        public void onRestoreStart(TopicPartition tp, String store, long start, long end) {
            started.put(tp, System.nanoTime());
        }

        @Override
        public void onBatchRestored(TopicPartition tp, String store, long end, long restored) {}

        @Override
        public void onRestoreEnd(TopicPartition tp, String store, long restored) {
            Long since = started.remove(tp);
            long ms = since == null ? -1 : (System.nanoTime() - since) / 1_000_000;
            System.out.println(
                    "KSTREAMS-RESTORED store=" + store + " partition=" + tp + " records=" + restored + " ms=" + ms);
            System.out.flush();
        }
    }

    private static byte[] totals(long count, long sum) {
        return ByteBuffer.allocate(16).putLong(count).putLong(sum).array();
    }

    private static long amount(byte[] value) {
        try {
            return JSON.readTree(value).get("amount").asLong();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    private static byte[] json(byte[] totals) {
        ByteBuffer t = ByteBuffer.wrap(totals);
        return ("{\"count\":" + t.getLong() + ",\"sum\":" + t.getLong() + "}")
                .getBytes(StandardCharsets.UTF_8);
    }
}
